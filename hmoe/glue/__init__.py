"""GLUE fine-tuning: task readers (`tasks`), official metrics (`metrics`), inputs (`data`), the classifier on the LM
trunk (`model`), the recipe (`config`) and the fine-tuning loop (`finetune`)."""
