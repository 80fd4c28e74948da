"""Shared fixtures: the data folder and tiny GPT-2, BERT and Llama models (random weights, seeded)."""

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

DATA = Path(os.environ.get("TENSORLM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"shared data folder {DATA} is missing (set TENSORLM_DATA)"
    return DATA


def make_tiny_gpt2(n_layer: int = 2, vocab_size: int = 100, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """GQA (4 query heads, 2 key/value heads), tied embeddings: the shape of SmolLM2 in miniature."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        num_hidden_layers=2, intermediate_size=128, vocab_size=256,
                                        max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0)).eval()


@pytest.fixture
def one_thread():
    """The machine's two cores are shared: one thread makes tiny training runs fast and their timing stable
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that trains)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()


@pytest.fixture
def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def gpt2_folder_and_data(tmp_path, data_dir):
    """A tiny random GPT-2 saved with the real GPT-2 tokenizer, and a data folder whose ``lm_text`` holds 40
    short repetitive documents: enough for calibration, reconstruction and a few distillation steps."""
    folder = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer").save_pretrained(folder)
    data = tmp_path / "data"
    (data / "lm_text").mkdir(parents=True)
    (data / "lm_text" / "a.txt").write_text("\n\n".join(f"Document {i}. " + "The quick brown fox jumps over it. " * 30
                                                       for i in range(40)))
    return folder, data
