"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer and chat template.

Built in the test session (nothing is downloaded); saved as a normal Hugging Face model
directory so the trainer's real loading path is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

CORPUS = [
    "Where is my order? It was supposed to arrive on Monday.",
    "I am sorry for any inconvenience. Your order 1234 ships today.",
    "Your refund was issued to the original card and takes 3-5 days.",
    "Please reset your password from the account settings page.",
    "The capital of France is Paris. Water boils at 100 degrees.",
    "Thanks for reaching out! I can help with billing and shipping questions.",
] * 20


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


PAIRS = [
    {
        "prompt": "Where is my order 1234?",
        "chosen": "Order 1234 ships today.",
        "rejected": "I am sorry for any inconvenience. I am so sorry. Order 1234 ships today.",
    },
    {
        "prompt": [{"role": "user", "content": "How do I get a refund?"}],
        "chosen": "Refunds go to the original card in 3-5 days.",
        "rejected": "I am sorry for any inconvenience. Refunds go to the original card.",
    },
    {
        "prompt": "I cannot log in.",
        "chosen": "Reset your password from the account settings page.",
        "rejected": "I am sorry for any inconvenience. Please reset your password.",
    },
    {
        "prompt": "Can you help with billing?",
        "chosen": "Yes, I can help with billing questions.",
        "rejected": "I am sorry for any inconvenience. I can help.",
    },
]


@pytest.fixture()
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 4))
    return path


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    import tempfile

    from services import postgres_server

    # Outside pytest's tmp dir: that one is private to root, and PostgreSQL runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="alignd-pg-"))
    yield from postgres_server(base)


@pytest.fixture()
def broker():
    from demo.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


# --- fault figures ----------------------------------------------------------------------------
# Fault tests record what they produced and where it ended up; the table is printed at the end
# of every run (CI included), so the figures travel with the result, not only in a note.
_FAULT_FIGURES: list[tuple[str, dict[str, int | float | str]]] = []


@pytest.fixture()
def fault_figures():
    def record(scenario: str, **figures: int | float | str) -> None:
        _FAULT_FIGURES.append((scenario, figures))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FAULT_FIGURES:
        return
    terminalreporter.section("fault figures")
    for scenario, figures in _FAULT_FIGURES:
        shown = "  ".join(
            f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in figures.items()
        )
        terminalreporter.write_line(f"{scenario:44} {shown}")
