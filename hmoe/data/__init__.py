"""Data: WikiText files and the encoded-split cache (`wikitext`), the offline byte-level BPE (`tokenizer`), stateless
batching (`batching`) and a run's corpus (`corpus`). `python -m hmoe.data` downloads and counts WikiText."""
