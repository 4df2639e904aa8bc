"""``vitq methods``: the schemes, weight roundings, methods (with expected times), refiners and quantizer kinds."""

from __future__ import annotations

from vitq.cli.common import first_sentence


def add_command(sub) -> None:
    m = sub.add_parser("methods", help="list schemes, methods (with expected times), refiners and quantizer kinds")
    m.set_defaults(func=cmd_methods)



def cmd_methods(args) -> int:
    import textwrap

    from vitq.quant.base import QUANTIZER_KINDS
    from vitq.refine.gptq import ROUNDINGS
    from vitq.registry import METHODS, REFINERS
    from vitq.scheme import SCHEMES
    width = 110

    def show(name: str, desc: str, time_note: str = "") -> None:
        lines = textwrap.wrap(desc, width - 16) or [""]
        print(f"  {name:<13} {lines[0]}")
        for line in lines[1:]:
            print(f"  {'':<13} {line}")
        for line in textwrap.wrap(f"time: {time_note}", width - 18) if time_note else []:
            print(f"  {'':<15} {line}")

    print("schemes:")
    for name, desc in SCHEMES.items():
        show(name, desc)
    print("weight rounding (--weight-rounding, after --method):")
    for name, desc in ROUNDINGS.items():
        show(name, desc)
    for title, table in (("methods (--method)", METHODS), ("refiners (--refine)", REFINERS)):
        print(f"{title}:")
        for name, entry in table.items():
            show(name, entry.description, entry.expected_time or "not documented by the method")
    print("quantizer kinds (--softmax-quantizer):")
    for name, kind in QUANTIZER_KINDS.items():
        if name != "base":
            show(name, first_sentence(kind.__doc__ or ""))
    print("\nTimes are measured on this project's 2-core CPU (BENCHMARKS.md) unless they say otherwise; a shared "
          "or busier machine is slower.\nOptions of one method: vitq quantize --method NAME --help")
    return 0


