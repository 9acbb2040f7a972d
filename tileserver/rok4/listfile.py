"""The `.list` file beside a descriptor: roots, `#`, then one `<root index>/<slab>` line per slab.

It names every slab (own or linked), so copies and updates never walk the storage tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlabList:
    roots: dict[int, str] = field(default_factory=dict)
    entries: list[tuple[int, str, str]] = field(default_factory=list)  # (root index, slab, md5 or "")

    def slabs(self) -> list[str]:
        """Full paths (root + slab) of every listed slab."""
        return [f"{self.roots[root]}/{slab}" for root, slab, _ in self.entries]

    def to_text(self) -> str:
        lines = [f"{i}={root}" for i, root in sorted(self.roots.items())]
        lines.append("#")
        lines.extend(f"{root}/{slab}" + (f" {md5}" if md5 else "") for root, slab, md5 in self.entries)
        return "\n".join(lines) + "\n"


def parse_list(text: str) -> SlabList:
    result = SlabList()
    in_roots = True
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if in_roots:
            if line == "#":
                in_roots = False
                continue
            index, sep, root = line.partition("=")
            if not sep or not index.isdigit():
                raise ValueError(f"list line {number}: expected '<index>=<root>' ({line!r})")
            result.roots[int(index)] = root
            continue
        path, _, md5 = line.partition(" ")
        index, sep, slab = path.partition("/")
        if not sep or not index.isdigit() or int(index) not in result.roots:
            raise ValueError(f"list line {number}: expected '<root index>/<slab>' ({line!r})")
        result.entries.append((int(index), slab, md5.strip()))
    return result
