"""The request bodies of the OpenAI-compatible API as pydantic models, and the API's errors.

A body is parsed and checked in one call (`parse`: pydantic's own JSON parser, then the models), so
every bad request is a 400 the same way, naming the field in `param`: malformed JSON, JSON nested too
deep, a lone surrogate, Infinity or NaN, a value of the wrong type (strict: "stream": "no" is not a
bool, "temperature": "0.5" is not a number), a value out of range. Unknown fields are ignored, as
OpenAI's clients send some this server has no use for; null means "the default", as in OpenAI's API.
"""

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.sampling_params import MAX_LOGPROBS

ERROR_TYPES = {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer other than 200, as OpenAI writes it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Number = Annotated[float, Field(allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = list[Annotated[int, Field(ge=0)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Request(BaseModel):
    """What both endpoints take: the sampling parameters (vLLM's names for those OpenAI lacks)."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    temperature: Number = Field(1.0, ge=0)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[Text, list[Text]] = Field([], description="a non-empty string or a list of them")
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    top_k: int = Field(0, ge=-1)
    min_p: Number = Field(0.0, ge=0, le=1)
    repetition_penalty: Number = Field(1.0, gt=0)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Request):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]] = Field(
        description="a string, a list of strings, a list of token ids or a list of such lists")
    max_tokens: int = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, prompt):
        if not prompt:
            raise ValueError("empty")
        return prompt

    @property
    def prompts(self) -> list:
        """The prompt as a list of prompts (a string or a list of token ids)."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # None: up to the context
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name, preferred when both are set
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """The request body as `model`, or a 400 naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    if err["type"].startswith("json") or not loc:
        raise APIError(400, f"the request body is not a valid JSON object ({err['msg']})")
    param = loc[0]
    field = model.model_fields.get(param)
    if field is not None and field.description:  # a union: pydantic's message is about one of its branches
        raise APIError(400, f"'{param}' must be {field.description}", param=param)
    raise APIError(400, f"'{'.'.join(loc)}': {err['msg']}", param=param)
