"""tools/cuda_report.py reads cuobjdump's output right: a fake cuobjdump prints a known
resource-usage table and SASS, and the report must give each kernel's registers, spills,
occupancy bound and access widths."""
from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

USAGE = """
Fatbin elf code:
================
Resource usage:
 Function _Z7kernelAv:
  REG:62 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:32080 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z7kernelBv:
  REG:128 STACK:8 SHARED:0 LOCAL:16 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SASS = """
        Function : _Z7kernelAv
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E R12, desc[UR4][R2.64] ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0050*/              @P0  STG.E desc[UR4][R2.64], R4 ;
        Function : _Z7kernelBv
        /*0010*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0030*/                   STG.E.U16 desc[UR4][R2.64], R4 ;
"""


def load_tool():
    spec = importlib.util.spec_from_file_location("cuda_report", REPO / "tools" / "cuda_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cuobjdump(tmp_path: Path) -> str:
    (tmp_path / "usage.txt").write_text(USAGE)
    (tmp_path / "sass.txt").write_text(SASS)
    script = tmp_path / "cuobjdump"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      f"name = 'usage.txt' if '-res-usage' in sys.argv else 'sass.txt'\n"
                      f"print(open({str(tmp_path)!r} + '/' + name).read())\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_report_reads_registers_spills_and_widths(tmp_path):
    tool = load_tool()
    rows = {r["kernel"]: r for r in tool.report("unused.so", fake_cuobjdump(tmp_path))}
    a, b = rows["kernelA"], rows["kernelB"]
    assert (a["regs"], a["stack"], a["local"]) == (62, 0, 0)
    assert (b["regs"], b["stack"], b["local"]) == (128, 8, 16)
    assert dict(a["loads"]) == {16: 2, 4: 1} and dict(a["stores"]) == {16: 1, 4: 1}
    assert dict(b["loads"]) == {2: 1, 8: 1} and dict(b["stores"]) == {2: 1}
    # 62 registers: 2048 per warp after rounding to 256, 32 of 64 warps; 128: 16 warps
    assert a["occupancy"] == 0.5 and b["occupancy"] == 0.25


def test_report_table_names_the_spilling_kernels(tmp_path, capsys):
    tool = load_tool()
    assert tool.main(["unused.so", "--cuobjdump", fake_cuobjdump(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `kernelA` | 62 | 0 | 0 | 50% | 16B:2 4B:1 | 16B:1 4B:1 |" in out
    assert "2 kernels in 2 rows; 1 of them with stack or local memory (spills): kernelB" in out


def test_missing_cuobjdump_is_one_clear_line(capsys):
    tool = load_tool()
    assert tool.main(["unused.so", "--cuobjdump", "/nonexistent/cuobjdump"]) == 2
    assert "pip install nvidia-cuda-cuobjdump" in capsys.readouterr().err


def test_table_variants_with_the_same_code_are_one_row():
    tool = load_tool()

    def row(name, regs, loads):
        return dict(kernel=name, regs=regs, stack=0, local=0, loads={16: loads}, stores={16: 1}, occupancy=0.5)

    rows = [row("void k<A, TableOf<240, 1536> >", 40, 3), row("void k<A, TableOf<8, 64> >", 40, 3),
            row("void k<B, TableOf<240, 1536> >", 40, 3), row("void k<B, TableOf<8, 64> >", 48, 3),
            row("void other<C>", 32, 1)]
    merged = {r["kernel"]: r["regs"] for r in tool.merge_table_variants(rows)}
    assert merged == {"void k<A> (both tables)": 40, "void k<B, TableOf<240, 1536> >": 40,
                      "void k<B, TableOf<8, 64> >": 48, "void other<C>": 32}
