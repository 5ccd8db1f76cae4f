"""The Harbor Support showcase: a simulated support desk around SmolLM2, driven through the
real product (broker → ``alignd serve`` → refresh → gate), with a before/after report.

It stands above the product: it imports ``daemon``, ``feedback`` and ``trainer``; they never
import it, and none of it ships in the wheel or the image (docs/ARCHITECTURE.md).
"""
