"""Diagnostic of the one 16K reattention miss (depth 0.5, seed 0, needle 2399801, fp32).

Feeds the *unmodified* HF model (plain attention, contiguous positions, inside its 8K window) prompts
cut from the same 16K sample: the first 32 tokens (chat template + instruction), a window of the
haystack around the needle, and the last 4096 tokens (the question). Our scope at the last prompt
chunk has the same shape: sink 32 + up to 127 x 32 retrieved tokens + local 4096 (~8.2K).

    python launch/results/niah-2026-11-24/diag_16k_depth05.py    # CPU, fp32, ~3 minutes
"""

import torch

from dist_reattn.models.load import load_model, load_tokenizer, resolve
from dist_reattn.tasks.niah import build_sample, is_correct

torch.set_grad_enabled(False)
src = resolve("smollm2-135m")
tok = load_tokenizer(src)
hf = load_model(src, torch.float32, torch.device("cpu"))
sample = build_sample(tok, 16 * 1024, 0.5, seed=0)  # the sample of the miss (launch/niah.py, seed 0)
ids = torch.tensor(sample.input_ids)
n, at = len(ids), sample.needle_token
print(f"needle {sample.needle} at token {at} of {n}")
for half in (16, 64, 512, 1024, 2048):
    prompt = torch.cat([ids[:32], ids[at - half : at + half], ids[n - 4096 :]])
    out = hf.generate(prompt[None], max_new_tokens=16, do_sample=False)[0, prompt.numel() :]
    answer = tok.decode(out)
    verdict = "OK  " if is_correct(answer, sample) else "MISS"
    print(f"sink + needle +-{half} + last 4096 ({prompt.numel()} tokens): {verdict} {answer!r}")
