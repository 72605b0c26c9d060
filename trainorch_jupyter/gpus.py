"""One GPU vocabulary across providers: ``A100-80GB``, ``H100``, ``RTX4090``...

Each provider names its GPUs its own way (RunPod ``NVIDIA GeForce RTX 4090``, Lambda ``gpu_1x_a100_sxm4``
with a description ``1x A100 (40 GB SXM4)``, Vast ``RTX 4090`` / ``A100 SXM4``). :func:`canonical_gpu` maps a
name (and optionally the card's memory, which tells the A100 40/80 GB apart) to one canonical name, so that
``%train offers --gpu A100-80GB`` and ``--provider auto`` compare like with like; offers keep the provider's
own name beside it.
"""

from __future__ import annotations

import re

#: canonical name -> (VRAM in GB, patterns matched against a provider's name squashed to [a-z0-9])
_GPUS: list[tuple[str, float, tuple[str, ...]]] = [
    ("B200", 180, ("b200",)),
    ("GH200", 96, ("gh200",)),
    ("H200", 141, ("h200",)),
    ("H100", 80, ("h100",)),
    ("A100-80GB", 80, ("a10080gb", "a100sxm480gb", "a100pcie80gb", "a10080g")),
    ("A100-40GB", 40, ("a10040gb", "a100sxm440gb", "a100pcie40gb", "a10040g")),
    ("A100", 40, ("a100",)),
    ("L40S", 48, ("l40s",)),
    ("L40", 48, ("l40",)),
    ("L4", 24, ("l4",)),
    ("A6000", 48, ("rtxa6000", "a6000")),
    ("A5000", 24, ("rtxa5000", "a5000")),
    ("A4000", 16, ("rtxa4000", "a4000")),
    ("A40", 48, ("a40",)),
    ("A10", 24, ("a10",)),
    ("RTX6000-ADA", 48, ("rtx6000ada", "6000ada")),
    ("RTX4000-ADA", 20, ("rtx4000ada", "4000ada")),
    ("RTX5090", 32, ("rtx5090", "5090")),
    ("RTX4090", 24, ("rtx4090", "4090")),
    ("RTX3090", 24, ("rtx3090", "3090")),
    ("V100", 16, ("v100",)),
    ("T4", 16, ("t4",)),
]
_VRAM = {name: vram for name, vram, _ in _GPUS}
_VENDOR = re.compile(r"\b(nvidia|geforce|tesla)\b")


def squash(name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"`` -> ``"rtx4090"`` (for matching only)."""
    return re.sub(r"[^a-z0-9]", "", _VENDOR.sub("", name.lower()))


def canonical_gpu(name: str, vram_gb: float | None = None) -> str:
    """The canonical name of a provider's GPU name (``"NVIDIA A100 80GB PCIe"`` -> ``"A100-80GB"``). An A100
    whose name does not say its memory is told apart by ``vram_gb``. Unknown names come back squashed and
    upper-cased (``"MI300X"``), so they still compare equal across providers that spell them alike."""
    if vram_gb is None and (m := re.search(r"\((\d+)\s*GB", name, re.I)):
        vram_gb = float(m.group(1))  # "1x A100 (40 GB SXM4)": the memory the name gives
    s = squash(re.sub(r"\(.*?\)", "", name)) or squash(name)
    for canonical, _, patterns in _GPUS:
        if any(p in s for p in patterns):
            if canonical == "A100" and vram_gb is not None:  # the name did not say which A100
                return "A100-80GB" if vram_gb >= 60 else "A100-40GB"
            return canonical
    return s.upper() or name


def vram_of(canonical: str) -> float | None:
    """The usual memory (GB) of one card of a canonical GPU, if known."""
    return _VRAM.get(canonical)


def matches(wanted: str, canonical: str) -> bool:
    """Whether a user's ``--gpu`` (any spelling) asks for ``canonical``: ``A100`` matches both A100 sizes."""
    want = canonical_gpu(wanted)
    if want == "A100":
        return canonical.startswith("A100")
    return want == canonical
