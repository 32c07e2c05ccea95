"""`idlm cache ls|rm`: idlm's disk cache ($IDLM_CACHE, default ~/.cache/idlm)."""

import argparse

from idlm.models.cache import cache_root, entries, remove


def add_parsers(sub) -> None:
    p = sub.add_parser("cache", help="list or remove GGUF conversions, shapes and the built CPU kernel in idlm's cache",
                       description="idlm's disk cache ($IDLM_CACHE, default ~/.cache/idlm): one entry per GGUF "
                                   "file content (config, tokenizer, quantised blocks, dequantised weights per "
                                   "dtype), the random-weight shapes of `idlm bench --shape`, and the CPU group "
                                   "GEMM built on first use (one per torch version; built again when removed).")
    actions = p.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="list the entries with their size and source",
                            description="List the cache's entries: name, size, what each holds, its GGUF file.")
    ls.set_defaults(run=run_ls)
    rm = actions.add_parser("rm", help="remove entries (they are rebuilt when next needed)",
                            description="Remove entries by the name `idlm cache ls` prints, or all of them.")
    rm.add_argument("names", nargs="*", metavar="NAME", help="entries to remove (kind/name or name)")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    rm.set_defaults(run=run_rm)


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size / 1e3:,.0f} kB"


def run_ls(args: argparse.Namespace) -> None:
    found = entries()
    print(f"{cache_root()}: {len(found)} entries, {megabytes(sum(e.size for e in found))}")
    width = max((len(e.name) for e in found), default=0)
    for e in found:
        print(f"{e.name:<{width}}  {megabytes(e.size):>9}  {e.holds}" + (f"  (from {e.source})" if e.source else ""))


def run_rm(args: argparse.Namespace) -> None:
    if args.all == bool(args.names):
        raise ValueError("name the entries to remove (as `idlm cache ls` prints them), or give --all")
    removed = remove([e.name for e in entries()] if args.all else args.names)
    for e in removed:
        print(f"removed {e.name} ({megabytes(e.size)})")
    print(f"freed {megabytes(sum(e.size for e in removed))}")
