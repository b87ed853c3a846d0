"""Device options, declared once: name, type, default, help and validation.

A device type lists its options as ``Option`` values beside its builder
(crosvm keeps each device's options beside its ``start_device``); the
supervisor's ``--block``/``--serial``/``--rng`` keys, the TOML ``[[device]]``
tables and the standalone command's flags are all parsed by ``parse_options``
from that one list, so a key means the same thing and fails the same way
wherever it is written.

``ConfigError`` and ``parse_bool`` are the only ones of their kind in the
project: the supervisor's own keys use them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TRUE = frozenset({"true", "1", "yes", "on"})
FALSE = frozenset({"false", "0", "no", "off"})


class ConfigError(ValueError):
    """A configuration value is missing, unknown or wrong.

    Carries the device and key at fault (and the value, when there is one)
    and names all three in its message, so an operator sees exactly which
    part of which config line to fix: ``device 'blk0', key 'ro', value
    'maybe': not a boolean (true/false)``.
    """

    def __init__(self, message: str, key: str | None = None, device: str | None = None,
                 value: Any = None) -> None:
        self.message = message
        self.key = key
        self.device = device
        self.value = value
        where = []
        if device:
            where.append(f"device {device!r}")
        if key:
            where.append(f"key {key!r}")
        if value is not None:
            where.append(f"value {value!r}")
        super().__init__((", ".join(where) + ": " if where else "") + message)


def parse_bool(value: Any, key: str | None = None, device: str | None = None) -> bool:
    """``true/1/yes/on`` or ``false/0/no/off`` (any case), or a TOML boolean.

    An empty value is refused rather than read as true: ``ro=`` is more
    likely an unset variable than a decision (a bare ``ro`` is already
    ``ro=true`` after key=value splitting)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ConfigError("not a boolean (true/false)", key, device, value)


_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(raw: Any) -> int:
    """Bytes: a plain integer or one with a K/M/G/T suffix (powers of 1024;
    ``KiB``/``MB`` spellings accepted), e.g. ``256M``; ValueError otherwise."""
    text = str(raw).strip().lower().removesuffix("ib").removesuffix("b")
    number, suffix = text, ""
    if text and text[-1] in _SIZE_SUFFIX:
        number, suffix = text[:-1], text[-1]
    return int(number, 0) * _SIZE_SUFFIX[suffix]


#: Checks an option's parsed value; returns what is wrong with it, or None.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Option:
    """One device option.

    ``type`` is ``bool``, ``int`` or ``str``; an ``int`` is bounded by
    ``lo``/``hi``, a ``str`` with ``choices`` is one of them (compared in
    lower case).  ``check`` adds a rule the type cannot say (a power of
    two, a byte length).  ``flags`` are the standalone command's spellings
    (default ``--NAME``); ``cli=False`` keeps an option off that command
    (a crosvm key accepted only to be refused).
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    aliases: tuple[str, ...] = ()
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    check: Check | None = None
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    cli: bool = True
    #: An ``int`` of bytes that also takes a K/M/G/T suffix (powers of 1024), e.g. ``256M``.
    size: bool = False

    def __post_init__(self) -> None:
        if self.type not in (bool, int, str):
            raise TypeError(f"option {self.name}: type must be bool, int or str, not {self.type!r}")
        if self.type is int and (self.lo is None or self.hi is None):
            raise TypeError(f"option {self.name}: an int option needs lo and hi")

    @property
    def keys(self) -> tuple[str, ...]:
        """Every spelling accepted in key=value form."""
        return (self.name, *self.aliases)

    def parse(self, raw: Any, device: str | None = None, key: str | None = None) -> Any:
        """``raw`` (a string, or a TOML value) -> the typed value; ConfigError
        naming the device, the key as written and the value otherwise."""
        key = key or self.name
        value: Any
        if self.type is bool:
            value = parse_bool(raw, key, device)
        elif self.type is int:
            if isinstance(raw, bool):
                raise ConfigError("not an integer", key, device, raw)
            try:
                value = raw if isinstance(raw, int) else (parse_size(raw) if self.size else int(str(raw), 0))
            except ValueError:
                raise ConfigError("not a size (bytes, or with K/M/G/T)" if self.size else "not an integer",
                                  key, device, raw) from None
            assert self.lo is not None and self.hi is not None
            if not self.lo <= value <= self.hi:
                raise ConfigError(f"outside [{self.lo}, {self.hi}]", key, device, raw)
        else:
            value = str(raw)
            if self.choices:
                value = value.lower()
                if value not in self.choices:
                    raise ConfigError(f"not one of {', '.join(self.choices)}", key, device, raw)
            elif self.required and not value:
                raise ConfigError("is required", key, device)
        if self.check is not None:
            complaint = self.check(value)
            if complaint:
                raise ConfigError(complaint, key, device, raw)
        return value

    def describe(self) -> str:
        """The help text with the default, for --help and docs."""
        text = self.help
        if self.choices:
            text += f" ({'|'.join(self.choices)})"
        if self.default is not None:
            shown = str(self.default).lower() if self.type is bool else self.default
            text += f" (default {shown})"
        return text


def parse_options(options: Iterable[Option], raw: Mapping[str, Any], device: str, *,
                  ignored: Iterable[str] = ()) -> dict[str, Any]:
    """``{key: value}`` as written -> ``{option name: typed value}`` for every
    declared option (its default when absent).

    Refused: a key that is neither declared nor ``ignored`` (``readonly=true``
    silently doing nothing is worse than an error), a key given under two of
    its spellings, a required option missing, a bad value.
    """
    declared = tuple(options)
    by_key = {k: opt for opt in declared for k in opt.keys}
    skip = set(ignored)
    seen: dict[str, str] = {}
    out: dict[str, Any] = {opt.name: opt.default for opt in declared}
    for key, value in raw.items():
        key = str(key)
        opt = by_key.get(key)
        if opt is None:
            if key in skip:
                continue
            known = ", ".join(o.name for o in declared) or "none"
            raise ConfigError(f"unknown option (known: {known})", key, device, value)
        if opt.name in seen:
            first = seen[opt.name]
            raise ConfigError(f"given together with {first}={raw[first]!r} (one spelling only)",
                              key, device, value)
        seen[opt.name] = key
        out[opt.name] = opt.parse(value, device, key)
    for opt in declared:
        if opt.required and opt.name not in seen:
            raise ConfigError("is required", opt.name, device)
    return out
