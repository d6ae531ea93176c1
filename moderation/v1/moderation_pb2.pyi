from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_INPUT: _ClassVar[Role]
    ROLE_OUTPUT: _ClassVar[Role]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_INPUT_FLAGGED: _ClassVar[FinishReason]
    FINISH_REASON_OUTPUT_FLAGGED: _ClassVar[FinishReason]
ROLE_UNSPECIFIED: Role
ROLE_INPUT: Role
ROLE_OUTPUT: Role
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_INPUT_FLAGGED: FinishReason
FINISH_REASON_OUTPUT_FLAGGED: FinishReason

class ClassifyRequest(_message.Message):
    __slots__ = ("text", "role", "prompt", "messages", "policy", "threshold", "category_thresholds")
    class CategoryThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    role: Role
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    policy: str
    threshold: float
    category_thresholds: _containers.ScalarMap[str, float]
    def __init__(self, text: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., policy: _Optional[str] = ..., threshold: _Optional[float] = ..., category_thresholds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("category", "flagged", "scores", "categories", "paper_scores", "paper_category", "model", "policy", "prompt_tokens", "windows", "context_tokens", "context_messages_dropped")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    class PaperScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    PAPER_SCORES_FIELD_NUMBER: _ClassVar[int]
    PAPER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_MESSAGES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    category: str
    flagged: bool
    scores: _containers.ScalarMap[str, float]
    categories: _containers.ScalarMap[str, bool]
    paper_scores: _containers.ScalarMap[str, float]
    paper_category: str
    model: str
    policy: str
    prompt_tokens: int
    windows: int
    context_tokens: int
    context_messages_dropped: int
    def __init__(self, category: _Optional[str] = ..., flagged: _Optional[bool] = ..., scores: _Optional[_Mapping[str, float]] = ..., categories: _Optional[_Mapping[str, bool]] = ..., paper_scores: _Optional[_Mapping[str, float]] = ..., paper_category: _Optional[str] = ..., model: _Optional[str] = ..., policy: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., windows: _Optional[int] = ..., context_tokens: _Optional[int] = ..., context_messages_dropped: _Optional[int] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "max_new_tokens", "temperature", "top_p", "seed", "disable_guardrail", "system_prompt", "moderate_input", "moderate_output", "policy", "threshold", "stream_check_tokens")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DISABLE_GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODERATE_INPUT_FIELD_NUMBER: _ClassVar[int]
    MODERATE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STREAM_CHECK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    disable_guardrail: bool
    system_prompt: str
    moderate_input: bool
    moderate_output: bool
    policy: str
    threshold: float
    stream_check_tokens: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., disable_guardrail: _Optional[bool] = ..., system_prompt: _Optional[str] = ..., moderate_input: _Optional[bool] = ..., moderate_output: _Optional[bool] = ..., policy: _Optional[str] = ..., threshold: _Optional[float] = ..., stream_check_tokens: _Optional[int] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("messages", "max_new_tokens", "temperature", "top_p", "seed", "disable_guardrail", "system_prompt", "moderate_input", "moderate_output", "policy", "threshold", "stream_check_tokens")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DISABLE_GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODERATE_INPUT_FIELD_NUMBER: _ClassVar[int]
    MODERATE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STREAM_CHECK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    disable_guardrail: bool
    system_prompt: str
    moderate_input: bool
    moderate_output: bool
    policy: str
    threshold: float
    stream_check_tokens: int
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., disable_guardrail: _Optional[bool] = ..., system_prompt: _Optional[str] = ..., moderate_input: _Optional[bool] = ..., moderate_output: _Optional[bool] = ..., policy: _Optional[str] = ..., threshold: _Optional[float] = ..., stream_check_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "refused", "refusal", "finish_reason", "input_moderation", "output_moderation", "prompt_tokens", "completion_tokens", "model", "released_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_MODERATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODERATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RELEASED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    refused: bool
    refusal: str
    finish_reason: FinishReason
    input_moderation: ClassifyResponse
    output_moderation: ClassifyResponse
    prompt_tokens: int
    completion_tokens: int
    model: str
    released_tokens: int
    def __init__(self, text: _Optional[str] = ..., refused: _Optional[bool] = ..., refusal: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., input_moderation: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., output_moderation: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., model: _Optional[str] = ..., released_tokens: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: str
    final: GenerateResponse
    def __init__(self, delta: _Optional[str] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class ModerateStreamOpen(_message.Message):
    __slots__ = ("policy", "threshold", "category_thresholds", "prompt", "messages", "check_tokens")
    class CategoryThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CHECK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    threshold: float
    category_thresholds: _containers.ScalarMap[str, float]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    check_tokens: int
    def __init__(self, policy: _Optional[str] = ..., threshold: _Optional[float] = ..., category_thresholds: _Optional[_Mapping[str, float]] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., check_tokens: _Optional[int] = ...) -> None: ...

class ModerateStreamRequest(_message.Message):
    __slots__ = ("open", "delta", "done", "delta_bytes")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    open: ModerateStreamOpen
    delta: str
    done: bool
    delta_bytes: bytes
    def __init__(self, open: _Optional[_Union[ModerateStreamOpen, _Mapping]] = ..., delta: _Optional[str] = ..., done: _Optional[bool] = ..., delta_bytes: _Optional[bytes] = ...) -> None: ...

class ModerateStreamResponse(_message.Message):
    __slots__ = ("released_chars", "checked_tokens", "result", "complete")
    RELEASED_CHARS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    released_chars: int
    checked_tokens: int
    result: ClassifyResponse
    complete: bool
    def __init__(self, released_chars: _Optional[int] = ..., checked_tokens: _Optional[int] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., complete: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "demo", "dtype", "device", "attention_backend", "sliding_window", "max_context_tokens", "default_policy", "policies", "stream_check_tokens", "max_stream_checks", "stream_max_answer_chars", "decode_graphs", "decode_graph_batch_sizes", "graph_capture_seconds", "cpu_gemm", "cpu_gemm_measure_seconds", "generation_slots", "scoring_slots", "kv_cache_bytes", "default_threshold")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    STREAM_CHECK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_CHECKS_FIELD_NUMBER: _ClassVar[int]
    STREAM_MAX_ANSWER_CHARS_FIELD_NUMBER: _ClassVar[int]
    DECODE_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    DECODE_GRAPH_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CAPTURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_GEMM_FIELD_NUMBER: _ClassVar[int]
    CPU_GEMM_MEASURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SCORING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    demo: bool
    dtype: str
    device: str
    attention_backend: str
    sliding_window: int
    max_context_tokens: int
    default_policy: str
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    stream_check_tokens: int
    max_stream_checks: int
    stream_max_answer_chars: int
    decode_graphs: bool
    decode_graph_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    graph_capture_seconds: float
    cpu_gemm: str
    cpu_gemm_measure_seconds: float
    generation_slots: int
    scoring_slots: int
    kv_cache_bytes: int
    default_threshold: float
    def __init__(self, model: _Optional[str] = ..., demo: _Optional[bool] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., attention_backend: _Optional[str] = ..., sliding_window: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., default_policy: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ..., stream_check_tokens: _Optional[int] = ..., max_stream_checks: _Optional[int] = ..., stream_max_answer_chars: _Optional[int] = ..., decode_graphs: _Optional[bool] = ..., decode_graph_batch_sizes: _Optional[_Iterable[int]] = ..., graph_capture_seconds: _Optional[float] = ..., cpu_gemm: _Optional[str] = ..., cpu_gemm_measure_seconds: _Optional[float] = ..., generation_slots: _Optional[int] = ..., scoring_slots: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., default_threshold: _Optional[float] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "description", "acceptable_label", "categories", "threshold", "category_thresholds", "thresholds_source")
    class CategoryThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTABLE_LABEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    acceptable_label: str
    categories: _containers.RepeatedCompositeFieldContainer[CategoryInfo]
    threshold: float
    category_thresholds: _containers.ScalarMap[str, float]
    thresholds_source: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., acceptable_label: _Optional[str] = ..., categories: _Optional[_Iterable[_Union[CategoryInfo, _Mapping]]] = ..., threshold: _Optional[float] = ..., category_thresholds: _Optional[_Mapping[str, float]] = ..., thresholds_source: _Optional[str] = ...) -> None: ...

class CategoryInfo(_message.Message):
    __slots__ = ("id", "label", "description", "paper_category")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PAPER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    description: str
    paper_category: str
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., description: _Optional[str] = ..., paper_category: _Optional[str] = ...) -> None: ...
