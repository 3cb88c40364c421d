"""Generates text from a trained run, streaming tokens as they come, and reports prefill and decode speed.

  python -m experiments.generate --workdir=runs/small_moe --prompt="The city of" --max_new_tokens=40
  python -m experiments.generate --workdir=runs/small_moe --prompt="The city of" --temperature=0.8 --top_p=0.9

Greedy by default (`--temperature=0`); `--top_k` and `--top_p` restrict sampling. Decoding uses the key/value cache
(`hmoe.inference.generate`): one jitted prefill, then one compiled decode step per token.
"""

import sys
import time

import jax
from absl import app, flags

from hmoe.inference.run import load_run
from hmoe.inference.sampling import Sampler
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory (config.json, tokenizer.json, checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling rng seed.")

flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv):
  del argv
  quiet_library_logging()
  try:
    sampler = Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    loaded = load_run(_WORKDIR.value)
    prompt_ids = loaded.tokenizer.encode(_PROMPT.value)
    rng = jax.random.PRNGKey(_SEED.value)
    # Compiles the prefill for this prompt length and the decode step, so the timings below exclude it.
    list(loaded.generator.generate([prompt_ids], min(2, _MAX_NEW_TOKENS.value), rng, sampler))
    stream = loaded.generator.generate([prompt_ids], _MAX_NEW_TOKENS.value, rng, sampler)
    print(_PROMPT.value, end="", flush=True)
    start = time.perf_counter()
    generated, printed, first_token_at = [], "", None
    for tokens in stream:
      first_token_at = first_token_at or time.perf_counter()
      generated.append(int(tokens[0]))
      text = loaded.tokenizer.decode(generated)  # Whole-sequence decode: byte-level pieces join correctly.
      print(text[len(printed):], end="", flush=True)
      printed = text
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  end = time.perf_counter()
  print(f"\n\nprefill: {len(prompt_ids)} tokens in {first_token_at - start:.4f} s; decode: "
        f"{(len(generated) - 1) / max(end - first_token_at, 1e-9):.1f} tokens/s (batch 1, compiled beforehand)",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
