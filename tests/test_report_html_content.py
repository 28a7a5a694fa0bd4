"""The HTML writer is a thin client: it takes results and a ReportContent, never the configuration."""

from __future__ import annotations

import ast
import inspect

import tl_taskmap.report.html as report_html


def test_the_writer_neither_imports_nor_reads_the_configuration():
    tree = ast.parse(inspect.getsource(report_html))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m in ("tl_taskmap.report", "tl_taskmap.report.config", "tl_taskmap.report.pipeline", "tl_taskmap.report_config")
                   for m in imported if m)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    assert "config" not in names and "MapConfig" not in names


def test_write_report_takes_the_output_folder_and_a_report_content():
    assert list(inspect.signature(report_html.write_report).parameters) == ["out", "content"]
