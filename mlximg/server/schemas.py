"""The request bodies: OpenAI's image fields (unknown ones accepted and ignored, as OpenAI's clients send fields
this server has no use for) and mlximg's own beside them."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import field_error

MAX_IMAGES = 10  # OpenAI's bound on n
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class LoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    scale: FiniteFloat = 1.0


class ImageRequest(BaseModel):
    """What /v1/images/generations takes as JSON, and /v1/images/edits as form fields."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = None
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    # mlximg's own
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: FiniteFloat | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    teacache: bool | None = None
    stepcache: bool | None = None
    loras: list[LoRARequest] | None = None
    strength: FiniteFloat | None = Field(None, gt=0, le=1)  # edits: how much of the schedule runs

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        parse_size(size)
        return size

    def dimensions(self) -> tuple[int | None, int | None]:
        return parse_size(self.size)


def parse_size(size: str) -> tuple[int | None, int | None]:
    """"auto" (the model's default) or "WIDTHxHEIGHT"."""
    if size == "auto":
        return None, None
    width, separator, height = size.lower().partition("x")
    if not (separator and width.isdigit() and height.isdigit()):
        raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT such as '1024x1024', got {size!r}")
    return int(width), int(height)


def edit_request(form: dict) -> ImageRequest:
    """An edit's form fields (strings) as a request; OpenAI's clients send booleans and numbers as text."""
    from pydantic import ValidationError

    try:
        return ImageRequest.model_validate(form)
    except ValidationError as error:
        raise field_error(error.errors()) from None
