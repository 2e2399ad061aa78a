"""Counts a registry request may carry are bounded (each entry is a store row or an MLflow call):
past the limit the answer is INVALID_ARGUMENT naming the field and the limit, before any upload or
store work; at the limit the request goes through.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmops.common.errors import InvalidArgument
from llmops.registry.domain import DownloadRequest, ModelFormat, ModelRef, VersionSpec
from llmops.registry.requests import MAX_ALIASES, MAX_DOWNLOAD_PATHS, MAX_METRICS, MAX_TAGS
from llmops.registry.service import RegistryService
from tests.registry_support import upload_parts


def _spec(**extra: object) -> VersionSpec:
    fields: dict[str, object] = {"model_name": "tiny", "format": ModelFormat.FP32, "create_model": True}
    return VersionSpec(**{**fields, **extra})  # type: ignore[arg-type]


def _tags(count: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(count)}


async def test_model_tags_are_bounded(service: RegistryService) -> None:
    await service.create_model("ok", "", _tags(MAX_TAGS), "tester")
    with pytest.raises(InvalidArgument, match=f"at most {MAX_TAGS} tags") as error:
        await service.create_model("too-many", "", _tags(MAX_TAGS + 1), "tester")
    assert error.value.field == "tags"
    with pytest.raises(InvalidArgument, match=f"at most {MAX_TAGS} tags") as error:
        await service.list_models(page_size=0, page_token="", name_prefix="", tags=_tags(MAX_TAGS + 1))
    assert error.value.field == "tags"


@pytest.mark.parametrize(
    ("extra", "field", "limit"),
    [
        ({"tags": _tags(MAX_TAGS + 1)}, "metadata.tags", MAX_TAGS),
        ({"metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}}, "metadata.metrics", MAX_METRICS),
        ({"aliases": tuple(f"a{i}" for i in range(MAX_ALIASES + 1))}, "metadata.aliases", MAX_ALIASES),
    ],
)
async def test_registration_counts_are_bounded_before_upload(
    service: RegistryService, llama_dir: Path, extra: dict[str, object], field: str, limit: int
) -> None:
    with pytest.raises(InvalidArgument, match=f"at most {limit}") as error:
        await service.register_version(_spec(**extra), upload_parts(llama_dir), "tester")
    assert error.value.field == field


async def test_download_paths_are_bounded(service: RegistryService) -> None:
    request = DownloadRequest(ModelRef("tiny", version=1), paths=("x",) * (MAX_DOWNLOAD_PATHS + 1))
    with pytest.raises(InvalidArgument, match=f"at most {MAX_DOWNLOAD_PATHS} paths") as error:
        async for _ in service.download(request):
            pass
    assert error.value.field == "paths"
