#!/usr/bin/env python3
"""Lists import circles between the files of each given crate source folder
and fails when there is one.

A file depends on another when it names it: `crate::a::b`, `super::x`, a
`crate::{a, b}` group or, in a module file, one of its own child modules.
Test modules at the end of a file (`#[cfg(test)] mod tests`) are left out:
they may look at everything.

Usage: scripts/import-circles.py processor/src src
"""
import re
import sys
from pathlib import Path

def modules(src: Path):
    mods = {}
    for p in src.rglob("*.rs"):
        rel = p.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] in ("mod", "lib", "main"):
            parts = parts[:-1]
        mods[tuple(parts)] = p
    return mods

def strip_tests(text):
    m = re.search(r"\n#\[cfg\(test\)\]\s*\nmod tests\b", text)
    return text[: m.start()] if m else text

def deps(path, key, mods):
    text = strip_tests(path.read_text())
    text = re.sub(r"//[^\n]*", "", text)
    out = set()
    for m in re.finditer(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)", text):
        kind = m.group(1)
        # expand `crate::{a, b::c}` groups one level
        seg = text[m.start(): m.start() + 400]
        paths = []
        g = re.match(r"(crate|super)((?:::[a-z_][a-z0-9_]*)*)::\{([^}]*)\}", seg)
        if g:
            base = [x for x in g.group(2).split("::") if x]
            for item in g.group(3).split(","):
                item = item.strip().split("::")[0].strip()
                if item:
                    paths.append(base + [item])
        else:
            paths.append([x for x in m.group(2).split("::") if x])
        for p in paths:
            if kind == "super":
                p = list(key[:-1]) + p
            # longest module prefix
            for n in range(len(p), 0, -1):
                t = tuple(p[:n])
                if t in mods:
                    if t != key:
                        out.add(t)
                    break
            else:
                if () in mods and key != ():
                    out.add(())
    # A module file naming its own child modules (`kafka::x`, `pub use
    # kafka::X`) depends on them too.
    for m in re.finditer(r"\b([a-z_][a-z0-9_]*)::", text):
        child = key + (m.group(1),)
        before = text[max(0, m.start() - 2): m.start()]
        if child in mods and before != "::" and child != key:
            out.add(child)
    return out

def sccs(graph):
    index, low, stack, on, res, i = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: res.append(comp)
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index: visit(v)
    return res

bad = 0
for src in sys.argv[1:]:
    src = Path(src)
    mods = modules(src)
    graph = {k: deps(p, k, mods) for k, p in mods.items()}
    for comp in sccs(graph):
        bad += 1
        names = sorted("/".join(c) or "(root)" for c in comp)
        print(f"{src}: circle between {', '.join(names)}")
        for c in sorted(comp):
            inside = sorted("/".join(d) or "(root)" for d in graph[c] if d in comp)
            print(f"    {'/'.join(c) or '(root)'} -> {', '.join(inside)}")
sys.exit(1 if bad else 0)
