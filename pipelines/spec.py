"""The batch job spec: one YAML/JSON document, validated once, here.

Every mistake (an unknown key, a bad value) becomes one `ValueError` line that names the field,
e.g. `job spec: sampling.temperature: must be >= 0 (got -1)`. Nothing past this module
re-validates user input.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INPUT_FORMATS = ("jsonl", "json", "parquet", "csv", "text", "images", "openai_batch")
OUTPUT_FORMATS = ("parquet", "jsonl", "openai_batch")
TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".rst")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                     ".csv": "csv", **{e: "text" for e in TEXT_EXTENSIONS},
                     **{e: "images" for e in IMAGE_EXTENSIONS}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Strict):
    uri: str = Field(min_length=1)
    format: Literal[INPUT_FORMATS] | None = None    # None: by the extension of the files found
    id_column: str | None = None
    columns: list[str] | None = None
    limit: int | None = Field(default=None, ge=0)


class TaskSpec(Strict):
    kind: Literal["chat", "completion", "score"] = "chat"
    template: str = "{text}"
    system: str | None = None
    image_column: str | None = None
    enable_thinking: bool = False
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    truncate: bool = False

    @field_validator("template")
    @classmethod
    def template_parses(cls, value: str) -> str:
        template_fields(value)
        return value

    @model_validator(mode="after")
    def images_need_chat(self):
        if self.image_column is not None and self.kind != "chat":
            raise ValueError(f"image_column: images need kind 'chat', not {self.kind!r}")
        return self


class SamplingSpec(Strict):
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = 0
    stop: list[str] = []


class OutputSpec(Strict):
    uri: str = Field(min_length=1)
    format: Literal[OUTPUT_FORMATS] = "parquet"
    keep_columns: list[str] = []
    rows_per_shard: int = Field(default=256, ge=1)   # the unit of commit and of resume


class ResourcesSpec(Strict):
    replicas: int = Field(default=1, ge=1)
    ep_size: int = Field(default=1, ge=1)
    gpus_per_rank: float = Field(default=0, ge=0)
    batch_size: int = Field(default=32, ge=1)
    cpus_per_replica: float = Field(default=1, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_num_seqs: int = Field(default=64, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)


class StorageSpec(Strict):
    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False


class JobSpec(Strict):
    name: str
    model: str = Field(min_length=1)
    input: InputSpec
    task: TaskSpec = TaskSpec()
    sampling: SamplingSpec = SamplingSpec()
    output: OutputSpec
    resources: ResourcesSpec = ResourcesSpec()
    storage: StorageSpec = StorageSpec()

    @field_validator("name")
    @classmethod
    def name_is_a_key(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (got {value!r})")
        return value


def template_fields(template: str) -> list[str]:
    """The column names a `str.format` template reads; raises on a malformed template."""
    import string
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"not a valid template: {e}") from None
    if any(n == "" or not n.isidentifier() for n in names):
        raise ValueError("template fields must be column names like {text}")
    return names


def one_line(error: ValidationError) -> str:
    """The first problem pydantic found, as `field.path: message (got value)`."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "spec"
    message = first["msg"].removeprefix("Value error, ")
    field = re.match(r"^([a-z_]+): ", message)
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif field:                                  # a cross-field check names its own field
        where, message = f"{where}.{field.group(1)}", message[field.end():]
    elif first["type"] != "missing" and not message.endswith(")"):
        message += f" (got {first.get('input')!r})"
    more = len(error.errors()) - 1
    return f"job spec: {where}: {message}" + (f" [+{more} more]" if more else "")


def parse_spec(raw: dict) -> JobSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"job spec: must be a mapping of keys, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ValueError(one_line(e)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON job spec file (JSON is YAML, so one parser reads both)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"job spec {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"job spec {str(path)!r}: not valid YAML/JSON: {str(e).splitlines()[0]}")
    return parse_spec(raw)


def spec_json(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)
