"""File-format versions live in one registry (tl_taskmap.state_io.FORMAT_VERSIONS); the public constants read it."""

from __future__ import annotations

import pytest

from tl_taskmap import embedded, report_stages, sinks, state_io
from tl_taskmap.state_io import FORMAT_VERSIONS, FormatVersionError, check_format
from tl_taskmap.stats import results


def test_public_constants_are_the_registry_entries():
    assert state_io.FORMAT_VERSION == FORMAT_VERSIONS["state"]
    assert results.FORMAT_VERSION == FORMAT_VERSIONS["layer_stats"]
    assert sinks.FORMAT_VERSION == FORMAT_VERSIONS["activations"]
    assert report_stages.RECORD_VERSION == FORMAT_VERSIONS["stage_record"]
    assert embedded.MANIFEST_VERSION == FORMAT_VERSIONS["model_manifest"]


def test_a_wrong_version_names_the_file_the_format_and_both_versions():
    check_format("activations", "1", "a.safetensors")  # safetensors metadata holds text
    with pytest.raises(FormatVersionError, match=r"a\.safetensors has activations format version 7; this tl_taskmap reads version 1"):
        check_format("activations", 7, "a.safetensors")
    with pytest.raises(ValueError):  # a FormatVersionError is a ValueError, as the per-module errors were
        check_format("layer_stats", None, "r/layers/stats")
    with pytest.raises(KeyError):
        check_format("no such format", 1)
