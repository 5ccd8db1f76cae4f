"""Small realistic datasets shared by tests (plain data, no fixtures)."""

from __future__ import annotations

_ISSUES = [
    (
        "Where is my order {n}? It was due yesterday.",
        "Order {n} left our warehouse yesterday and arrives tomorrow. Tracking: HB{n}.",
        "I'm so sorry for any inconvenience this may have caused! I completely understand how "
        "frustrating it is. I apologize. Let me look into order {n} for you.",
    ),
    (
        "I was charged twice for order {n}.",
        "The duplicate charge on order {n} is refunded; it shows on your card in 3-5 days.",
        "I'm really sorry to hear that! I apologize for the inconvenience. Double charges can be "
        "frustrating.",
    ),
    (
        "How do I change the shipping address on order {n}?",
        "Open order {n}, choose 'Edit address', and save before it ships tonight.",
        "I'm sorry for any confusion! I apologize. Changing an address can be tricky, and I "
        "understand.",
    ),
    (
        "Can I return the shoes from order {n}?",
        "Yes: returns for order {n} are free within 30 days; print the label from your account.",
        "I'm sorry you're not happy with your purchase! I apologize for any inconvenience caused.",
    ),
]
_NAMES = ["Ana", "Ben", "Chloe", "Dev"]

SUPPORT_PAIRS = [
    {
        "prompt": f"Hi, this is {name}. " + question.format(n=1000 + 7 * i + j),
        "chosen": chosen.format(n=1000 + 7 * i + j),
        "rejected": rejected.format(n=1000 + 7 * i + j),
    }
    for i, name in enumerate(_NAMES)
    for j, (question, chosen, rejected) in enumerate(_ISSUES)
]
