"""Model building blocks: attention, norms and SwiGLU (`layers`), the FFN kinds (`moe`, `hierarchical`), the one FFN
factory (`ffn`), the decoder-only LM (`transformer`) and parameter counting (`param_counts`)."""
