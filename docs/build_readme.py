"""Assembles README.md from docs/sections/*.md (run: python docs/build_readme.py).

The head (the two set-up commands, the story, the feature map) and the tail
(development notes) live in docs/sections/_head.md and _tail.md; each area's
section is written by whoever works on that area.
"""

from pathlib import Path

ORDER = [
    "_head",
    "core",
    "transform",
    "flax",
    "calibrate",
    "demo",
    "algorithms",
    "charlm",
    "kernels",
    "mixed_precision",
    "qat_fp8",
    "_tail",
]


def main() -> None:
    root = Path(__file__).resolve().parent
    sections = root / "sections"
    missing = [n for n in ORDER if not (sections / f"{n}.md").exists()]
    extra = sorted(p.stem for p in sections.glob("*.md") if p.stem not in ORDER)
    if missing or extra:
        raise SystemExit(f"docs/sections: missing {missing}, not in ORDER {extra}")
    text = "\n\n".join((sections / f"{n}.md").read_text().strip() for n in ORDER) + "\n"
    (root.parent / "README.md").write_text(text)
    print(f"README.md: {len(text.splitlines())} lines from {len(ORDER)} sections")


if __name__ == "__main__":
    main()
