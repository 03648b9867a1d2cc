"""Request and response bodies of the scoring API: its documentation and its validation.

A row is one Criteo record without its label, in either of two shapes (mixable in one
request): arrays `{"dense": [13 × int|null], "categorical": [26 × hex|null]}`, or named
fields `{"I1": …, "C26": …}` where an absent field means missing. The whole body is parsed
and validated by pydantic-core in one pass (`parse_score_request`); the error list it gives
is turned into messages that name the row and the field (`describe_errors`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict

from data_pipeline.schema import DENSE_COLUMNS, NUM_DENSE, NUM_SPARSE, SPARSE_COLUMNS
from services.bodies import clip, name_bad_escape, shorten

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# A ceiling no configuration can raise: it bounds what one body can make the replica parse.
# The deployment's own (smaller) maximum is `ScoringSettings.max_rows_per_request`.
HARD_MAX_ROWS = 65_536

# A JSON number with no fraction (14 and 14.0 alike: JSON Schema's "integer" admits both,
# so the service does too), within int32. Strict: "7" and true are not numbers.
DenseValue = Annotated[
    Annotated[float, Strict(), Field(ge=INT32_MIN, le=INT32_MAX, multiple_of=1)] | None,
    Field(description="integer feature (int32; 14 and 14.0 alike), or null when missing",
          examples=[5, None]),
]
# 1–8 hex digits like the TSV reader accepts (a 32-bit hash, leading zeros optional); "" and
# null both mean missing, as an empty TSV field does.
CategoricalValue = Annotated[
    Annotated[str, StringConstraints(max_length=8, pattern=r"^[0-9a-fA-F]*$")] | None,
    Field(description="categorical feature: up to 8 hex digits, or null / \"\" when missing",
          examples=["05db9164", None]),
]

_ROW_CONFIG = ConfigDict(extra="forbid")


class ArrayRow(TypedDict):
    """A row as two arrays in Criteo's column order (I1..I13, then C1..C26)."""

    __pydantic_config__ = _ROW_CONFIG  # type: ignore[misc]

    dense: Annotated[list[DenseValue], Field(min_length=NUM_DENSE, max_length=NUM_DENSE)]
    categorical: Annotated[
        list[CategoricalValue], Field(min_length=NUM_SPARSE, max_length=NUM_SPARSE)
    ]


# A TypedDict rather than a model: rows arrive by the thousand, and a plain dict of the
# fields present is both cheaper to build and what the vectoriser wants.
NamedRow = TypedDict(  # type: ignore[misc]
    "NamedRow",
    {name: DenseValue for name in DENSE_COLUMNS}
    | {name: CategoricalValue for name in SPARSE_COLUMNS},
    total=False,
)
NamedRow.__doc__ = "A row as named fields I1..I13, C1..C26; an absent field is missing."
NamedRow.__pydantic_config__ = _ROW_CONFIG  # type: ignore[attr-defined]


def _row_shape(row: Any) -> str | None:
    if isinstance(row, dict):
        return "arrays" if ("dense" in row or "categorical" in row) else "named"
    return None


Row = Annotated[
    Annotated[ArrayRow, Tag("arrays")] | Annotated[NamedRow, Tag("named")],
    Discriminator(
        _row_shape,
        custom_error_type="row_shape",
        custom_error_message=(
            "a row is an object: {\"dense\": [13 values], \"categorical\": [26 values]} "
            "or named fields I1..I13, C1..C26"
        ),
    ),
]

_EXAMPLE_ROW = {
    "dense": [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, None, 2],
    "categorical": [
        "68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8",
        "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef",
        "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c",
        None, "3a171ecb", "c5c50484", "e8b83407", "9727dd16",
    ],
}
_EXAMPLE_NAMED = {"I1": 1, "I2": 1, "I3": 5, "C1": "68fd1e64", "C2": "80e26c9b", "C3": None}
# Shown in the /docs page's example picker for POST /v1/score.
REQUEST_EXAMPLES = {
    "arrays": {"summary": "one row as two arrays (I1..I13, C1..C26)",
               "value": {"rows": [_EXAMPLE_ROW]}},
    "named": {"summary": "one row as named fields (absent fields are missing)",
              "value": {"rows": [_EXAMPLE_NAMED]}},
    "mixed": {"summary": "both shapes in one batch",
              "value": {"rows": [_EXAMPLE_ROW, _EXAMPLE_NAMED]}},
}


class ScoreRequest(BaseModel):
    """A batch of rows to score; one probability comes back per row, in order."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"rows": [_EXAMPLE_ROW]}, {"rows": [_EXAMPLE_NAMED]}]},
    )

    rows: list[Row] = Field(
        min_length=1,
        max_length=HARD_MAX_ROWS,
        description="rows to score (at least 1; at most the deployment's "
        "max_rows_per_request, see GET /v1/model)",
    )


class ScoreResponse(BaseModel):
    """Click probabilities, one per request row, and the model version that made them."""

    version: str = Field(description="version of the model that scored every row",
                         examples=["2024-06-01"])
    probabilities: list[float] = Field(description="P(click) per row, in request order",
                                       examples=[[0.0312, 0.2551]])


class ErrorItem(BaseModel):
    """One problem with a request, located as precisely as it can be."""

    row: int | None = Field(description="0-based index into `rows`, when one row is at fault")
    field: str | None = Field(description="Criteo column (I1..I13, C1..C26) or body field")
    loc: str = Field(description="JSON path of the problem, e.g. rows[3].dense[5]")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx answer: one line for people, the list for programs."""

    detail: str = Field(examples=["rows[3].I6: Input should be less than or equal to 2147483647"])
    errors: list[ErrorItem] = Field(default_factory=list)


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Whether this replica can score, and with which model."""

    ready: bool
    version: str | None = Field(description="version being served (null before the first); "
                                "a refused model change is in GET /v1/model and the log")


class ModelInfo(BaseModel):
    """What this replica serves: its version, settings and the model's public description."""

    version: str
    loaded_at: float = Field(description="Unix time the model was loaded")
    replica: str = Field(description="the Serve replica that answered (changes only when "
                         "a replica is replaced, not when its model is swapped)")
    reload_error: str | None = Field(
        description="why the latest model change was refused (this model kept serving); "
                    "the full reason is in the replica's log")
    settings: dict[str, Any] = Field(description="batching and size limits")
    model: dict[str, Any] = Field(description="features, dimensions, methods, serving bytes, "
                                  "metrics, version (from model.json, without paths)")


_REQUEST = TypeAdapter(ScoreRequest)


class _ArrayFirstRequest(BaseModel):
    """ScoreRequest's twin that tries each row as arrays, then as named fields.

    It accepts exactly the same bodies (a valid array row has "dense", which named rows
    forbid) but skips the per-row discriminator call, a third of the parse time of a body
    of array rows. Its errors list both shapes' complaints, so a failure is re-parsed by
    ScoreRequest for messages that name the row's own shape.
    """

    model_config = ConfigDict(extra="forbid")

    rows: Annotated[
        list[Annotated[ArrayRow | NamedRow, Field(union_mode="left_to_right")]],
        Field(min_length=1, max_length=HARD_MAX_ROWS),
    ]


_ARRAY_FIRST = TypeAdapter(_ArrayFirstRequest)
# Errors past this many are counted, not listed: a 4,096-row garbage body must not make a
# megabyte-sized error answer. Every echoed key or value is clipped too (`clip`), and the
# answer kept under MAX_ERROR_BYTES whatever the body held.
MAX_LISTED_ERRORS = 20
MAX_ERROR_BYTES = 4000


def parse_score_request(body: bytes) -> ScoreRequest | _ArrayFirstRequest:
    """Validate a raw JSON body in one pass (no json.loads first). Raises ValidationError.

    Either model has `.rows`: a list of dicts, {"dense", "categorical"} or named fields.
    """
    if b'"dense"' in body[:512]:
        try:
            return _ARRAY_FIRST.validate_json(body)
        except ValidationError:
            pass  # parse again below, for the precise messages
    return _REQUEST.validate_json(body)


def _column(loc: tuple[Any, ...]) -> str | None:
    """The Criteo column an error location points at, if any."""
    for i, part in enumerate(loc):
        if part in ("dense", "categorical") and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            names = DENSE_COLUMNS if part == "dense" else SPARSE_COLUMNS
            return names[loc[i + 1]] if loc[i + 1] < len(names) else None
        if isinstance(part, str) and (part in DENSE_COLUMNS or part in SPARSE_COLUMNS):
            return part
    return None


def _shown(value: Any) -> str:
    return clip(value) if isinstance(value, str) else shorten(repr(value), 32)


def _message(error: dict[str, Any], column: str | None, body: bytes) -> str:
    kind = error["type"]
    value = error.get("input")
    if column in SPARSE_COLUMNS:
        if kind == "string_too_long":
            return f"more than 8 hex digits: {_shown(value)}"
        if kind == "string_pattern_mismatch":
            return f"not a hex value: {_shown(value)}"
    if column in DENSE_COLUMNS and kind in ("float_type", "multiple_of"):
        return f"not an integer or null: {_shown(value)}"
    if kind == "json_invalid" and "escape" in error["msg"]:
        return _escape_message(error["msg"], body)
    if kind in ("too_short", "too_long") and error["loc"][-1:] in (("dense",), ("categorical",)):
        want = NUM_DENSE if error["loc"][-1] == "dense" else NUM_SPARSE
        got = len(value) if isinstance(value, list) else "?"
        return f"{got} values, expected {want}"
    if kind == "extra_forbidden" and isinstance(error["loc"][-1], str):
        return f"unknown field {clip(error['loc'][-1])} (rows have I1..I13 and C1..C26)"
    return shorten(error["msg"])


def _escape_message(msg: str, body: bytes) -> str:
    """pydantic-core's escape errors name a column, not the escape: name it."""
    where = msg.rpartition(" at line ")[2]
    line, _, column = where.partition(" column ")
    if not (line.isdigit() and column.isdigit()):
        return msg
    offset = sum(len(x) + 1 for x in body.split(b"\n")[: int(line) - 1]) + int(column)
    escape = name_bad_escape(body, offset)
    if escape is None:
        return msg
    why = ("a lone UTF-16 surrogate is not a character"
           if escape[2:3].lower() == "d" and len(escape) == 6 and escape[3:4].lower() in "89abcdef"
           else "not a valid JSON escape")
    return f"Invalid JSON: escape {escape} at line {line} column {column}: {why}"


def _path(loc: tuple[Any, ...]) -> str:
    # Drop the union tag ("arrays"/"named") that pydantic inserts after the row index.
    parts = [p for p in loc if p not in ("arrays", "named")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            name = p if len(str(p)) <= 32 else clip(str(p))
            out += f".{name}" if out else str(name)
    return out or "body"


def describe_errors(exc: ValidationError, body: bytes = b"") -> ErrorResponse:
    """A pydantic error list as messages that name the row and the field, under
    MAX_ERROR_BYTES however long the keys and values it echoes."""
    items = []
    errors = exc.errors(include_url=False)
    for error in errors[:MAX_LISTED_ERRORS]:
        loc = tuple(error["loc"])
        row = loc[1] if len(loc) > 1 and loc[0] == "rows" and isinstance(loc[1], int) else None
        column = _column(loc)
        field = column or next((p for p in reversed(loc) if isinstance(p, str)
                                and p not in ("arrays", "named")), None)
        if field is not None and len(field) > 32:
            field = clip(field)
        path = _path(loc)
        if column and not path.endswith(column):
            path = f"{path} ({column})"
        if error["type"] == "json_invalid":
            path, field = "body", None
        items.append(ErrorItem(row=row, field=field, loc=path,
                               msg=_message(error, column, body), type=error["type"]))
    while True:  # list fewer problems until the answer fits
        more = len(errors) - len(items)
        head = f"{items[0].loc}: {items[0].msg}"
        if len(errors) > 1:
            head += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''}"
            head += f", {more} not listed)" if more else ")"
        answer = ErrorResponse(detail=head, errors=items)
        if len(items) == 1 or len(answer.model_dump_json()) <= MAX_ERROR_BYTES:
            return answer
        items = items[:-1]
