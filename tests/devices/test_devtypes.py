"""Each device type is declared once (``devices/<type>.py: DEVICE``), and the
supervisor's flags and TOML, the standalone command, ``--print-capabilities``
and the pre-fork imports all read that declaration.

Why: a key that parses one way from ``--block`` and another way from a TOML
file or from ``vhost-supervisor device block`` is a configuration bug an
operator only finds in production; and a new device type that has to be
added in five places will be forgotten in one of them.  The toy type below
is registered in one place only and must show up everywhere.
"""

from __future__ import annotations

import json
import os
import tomllib
from typing import Any

import pytest

import devices
from devices.devtype import DEFAULT_MEMORY_LIMIT
from devices import DEVICE_TYPES, ConfigError, DeviceBuilder, DeviceType, Option, parse_bool, standalone
from devices.devtype import registry
from devices.options import parse_options
from supervisor import cli as supervisor_cli
from supervisor import config as C
from supervisor.supervision import CHILD_MODULES

POLICY_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "seccomp")

#: Options that must be present for a type's options to parse at all.
REQUIRED_SAMPLE = {"path": "/images/disk.img"}


def _samples(opt: Option) -> list[tuple[Any, str]]:
    """Valid (TOML value, command-line string) pairs for ``opt``."""
    if opt.type is bool:
        pairs: list[tuple[Any, str]] = [(True, "true"), (False, "false")]
    elif opt.type is int:
        assert opt.lo is not None and opt.hi is not None
        pairs = [(opt.lo, str(opt.lo)), (opt.hi, str(opt.hi))]
    elif opt.choices:
        pairs = [(c, c) for c in opt.choices]
    else:
        pairs = [("/some/where", "/some/where")]
    out = []
    for toml_value, text in pairs:
        try:
            opt.parse(text)
        except ConfigError:  # e.g. packed-queue=true: declared only to be refused
            continue
        out.append((toml_value, text))
    return out


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else ("true" if value else "false")


def _cases() -> list[tuple[str, str, Any, str]]:
    cases = []
    for dtype in DEVICE_TYPES.values():
        for opt in dtype.options:
            for toml_value, text in _samples(opt):
                cases.append((dtype.name, opt.name, toml_value, text))
    return cases


@pytest.mark.parametrize("type_name,key,toml_value,text", _cases())
def test_every_option_parses_the_same_from_flags_toml_and_standalone(sock_dir, type_name, key, toml_value,
                                                                     text):
    dtype = DEVICE_TYPES[type_name]
    opt = next(o for o in dtype.options if o.name == key)
    extra = {k: v for k, v in REQUIRED_SAMPLE.items()
             if any(o.name == k and o.required for o in dtype.options) and k != key}
    sock = f"{sock_dir}/d.sock"
    expected = opt.parse(text)

    # supervisor: --block/--serial/--rng key=value
    kv = ",".join([f"vhost={sock}", f"{key}={text}"] + [f"{k}={v}" for k, v in extra.items()])
    from_flag = C.build_config(ordered_flags=[(dtype.flag, kv)], control_socket=f"{sock_dir}/ctl.sock")
    parsed_flag = dtype.parse("d", from_flag.devices[0].options)
    assert parsed_flag[key] == expected

    # standalone: vhost-supervisor device TYPE --flag value
    argv = [type_name, "--socket-path", sock]
    for k, v in extra.items():
        argv += [_flag_of(dtype, k), v]
    argv += [_flag_of(dtype, key), text] if opt.cli else []
    if opt.cli:
        args = standalone._parser().parse_args(argv)
        assert dtype.parse("d", standalone.options_from_args(args)) == parsed_flag

    # TOML: [[device]] with a typed value (an option called "type" cannot be
    # written there: in a [[device]] table, type selects the device type)
    if key == "type":
        assert type_name == "console", "only the console's crosvm type= is command-line only"
        return
    path = f"{sock_dir}/c.toml"
    lines = ["[[device]]", f'type = "{dtype.name}"', f'vhost = "{sock}"', f"{key} = {_toml_value(toml_value)}"]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    tomllib.loads("\n".join(lines))  # the test's own TOML is valid
    from_toml = C.build_config(config_file=path, control_socket=f"{sock_dir}/ctl.sock")
    assert dtype.parse("d", from_toml.devices[0].options) == parsed_flag
    assert from_toml.devices[0].type == from_flag.devices[0].type == dtype.name


def _flag_of(dtype: DeviceType, key: str) -> str:
    opt = next(o for o in dtype.options if o.name == key)
    return (opt.flags or (f"--{opt.name}",))[0]


@pytest.mark.parametrize("type_name", list(DEVICE_TYPES))
def test_unknown_key_names_device_key_and_value(sock_dir, type_name):
    dtype = DEVICE_TYPES[type_name]
    sock = f"{sock_dir}/d.sock"
    extra = "".join(f",{k}={v}" for k, v in REQUIRED_SAMPLE.items()
                    if any(o.name == k and o.required for o in dtype.options))
    cfg = C.build_config(ordered_flags=[(dtype.flag, f"vhost={sock},name=dev0,colour=blue{extra}")],
                         control_socket=f"{sock_dir}/ctl.sock")
    with pytest.raises(ConfigError) as info:
        C.open_builders(cfg)
    err = info.value
    assert (err.device, err.key, err.value) == ("dev0", "colour", "blue")
    assert str(err).startswith("device 'dev0', key 'colour', value 'blue': unknown option")


def _bad_values() -> list[tuple[str, str]]:
    return [(t.name, o.name) for t in DEVICE_TYPES.values() for o in t.options
            if o.type in (bool, int) or o.choices]


@pytest.mark.parametrize("type_name,key", _bad_values())
def test_bad_value_names_device_key_and_value(type_name, key):
    dtype = DEVICE_TYPES[type_name]
    raw = {key: "wrong-value"}
    for k, v in REQUIRED_SAMPLE.items():
        if any(o.name == k and o.required for o in dtype.options):
            raw.setdefault(k, v)
    with pytest.raises(ConfigError) as info:
        dtype.builder.from_options("dev0", raw)   # refused before anything is opened
    err = info.value
    assert (err.device, err.key, err.value) == ("dev0", key, "wrong-value")
    assert "'dev0'" in str(err) and repr(key) in str(err) and "'wrong-value'" in str(err)


def test_one_config_error_and_one_boolean_parser():
    assert C.ConfigError is ConfigError and supervisor_cli.ConfigError is ConfigError
    assert C.parse_bool is parse_bool
    for text, want in (("on", True), ("YES", True), ("0", False), ("Off", False), (True, True)):
        assert parse_bool(text) is want
    for bad in ("", "maybe", "2"):
        with pytest.raises(ConfigError) as info:
            parse_bool(bad, "ro", "blk0")
        assert (info.value.device, info.value.key, info.value.value) == ("blk0", "ro", bad)
    # a supervisor key goes through the same parser and error
    with pytest.raises(ConfigError) as info:
        C._apply_supervisor_keys(C.SupervisorConfig(), {"disable-sandbox": "maybe"}, "test")
    assert (info.value.key, info.value.value) == ("disable-sandbox", "maybe")
    # and a standalone flag: a usage error carrying the same message
    with pytest.raises(SystemExit) as exit_info:
        standalone._parser().parse_args(["block", "--sparse", "maybe"])
    assert exit_info.value.code == 2


def test_options_refuse_two_spellings_and_keep_defaults():
    opts = (Option("ro", bool, False, "x", aliases=("read-only",)),
            Option("n", int, 3, "y", lo=0, hi=9))
    assert parse_options(opts, {}, "d") == {"ro": False, "n": 3}
    assert parse_options(opts, {"read-only": "on", "n": "0x7"}, "d") == {"ro": True, "n": 7}
    with pytest.raises(ConfigError) as info:
        parse_options(opts, {"ro": "true", "read-only": "true"}, "d")
    assert info.value.key == "read-only"


def test_declarations_are_complete():
    """Every registered type: its policy exists, its modules are imported
    before fork, its builder knows its declaration, and its options avoid the
    keys the supervisor and the standalone command keep for themselves."""
    from devices.devtype import RESERVED
    for name, dtype in DEVICE_TYPES.items():
        assert dtype.name == name and dtype.builder.declaration is dtype
        assert dtype.builder.seccomp_policy == dtype.seccomp_policy
        assert os.path.isfile(os.path.join(POLICY_DIR, dtype.seccomp_policy))
        assert set(dtype.modules) <= set(CHILD_MODULES)
        assert not {k for o in dtype.options for k in o.keys} & RESERVED
        assert devices.lookup(dtype.flag) is dtype
    assert set(C.SUPERVISOR_DEVICE_KEYS) <= RESERVED


@pytest.mark.parametrize("type_name", list(DEVICE_TYPES))
def test_print_capabilities_comes_from_the_declaration(type_name, capsys):
    assert standalone.main([type_name, "--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == DEVICE_TYPES[type_name].capabilities_json()


def test_declaration_mistakes_are_refused():
    class B(DeviceBuilder):
        pass
    with pytest.raises(ValueError, match="reserved"):
        DeviceType(name="x", builder=B, summary="", options=(Option("vhost", str),), seccomp_policy="x.policy")
    with pytest.raises(ValueError, match="declared twice"):
        DeviceType(name="x", builder=B, summary="", seccomp_policy="x.policy",
                   options=(Option("a", str), Option("b", str, aliases=("a",))))
    with pytest.raises(ValueError, match="policy"):
        DeviceType(name="x", builder=B, summary="", options=(), seccomp_policy="../x")
    with pytest.raises(TypeError):
        Option("n", int)   # an int option needs bounds
    rng = DEVICE_TYPES["rng"]
    with pytest.raises(ValueError, match="both answer to 'rng'"):
        registry(rng, DeviceType(name="rng", builder=B, summary="", options=(),
                                         seccomp_policy="x.policy"))


# ---------------------------------------------------------------------------
# A new type, registered in one place only

class ToyBuilder(DeviceBuilder):
    """Opens nothing; remembers its parsed options."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options

    @classmethod
    def from_options(cls, name: str, options: dict[str, str]) -> "ToyBuilder":
        return cls(name, cls.declaration.parse(name, options))

    def build(self, ex: Any) -> Any:
        raise NotImplementedError


TOY = DeviceType(
    name="toy", builder=ToyBuilder, summary="a device for this test",
    options=(Option("loud", bool, False, "shout"), Option("level", int, 1, "how much", lo=0, hi=9)),
    seccomp_policy="rng.policy", capabilities=("toy-feature",), child_modules=("json",),
    aliases=("plaything",),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(DEVICE_TYPES, "toy", TOY)
    return TOY


def test_a_new_type_needs_one_registry_entry(toy, sock_dir, capsys):
    # --print-capabilities and the standalone flags
    assert standalone.main(["toy", "--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "toy", "features": ["toy-feature"]}
    args = standalone._parser().parse_args(["toy", "--socket-path", "s", "--loud", "--level", "3"])
    assert standalone.options_from_args(args) == {"loud": "true", "level": "3"}
    with pytest.raises(SystemExit):
        standalone._parser().parse_args(["toy", "--socket-path", "s", "--level", "10"])
    # vhost-supervisor run --toy, and TOML type = "toy" / its alias
    flag_text = f"vhost={sock_dir}/t.sock,loud,level=3"
    run_args = supervisor_cli.build_parser().parse_args(["run", "--toy", flag_text])
    assert run_args.devices == [("toy", flag_text)]
    cfg = C.build_config(ordered_flags=run_args.devices, control_socket=f"{sock_dir}/ctl.sock")
    path = f"{sock_dir}/t.toml"
    with open(path, "w") as f:
        f.write(f'[[device]]\ntype = "plaything"\nvhost = "{sock_dir}/u.sock"\nloud = true\nlevel = 3\n')
    from_toml = C.build_config(config_file=path, control_socket=f"{sock_dir}/ctl.sock")
    assert cfg.devices[0].type == from_toml.devices[0].type == "toy"
    # the supervisor builds it (and checks its policy) from the declaration
    for c in (cfg, from_toml):
        builders = C.open_builders(c)
        (builder,) = builders.values()
        assert isinstance(builder, ToyBuilder) and builder.options == {"loud": True, "level": 3, "memory-limit": DEFAULT_MEMORY_LIMIT}
    # its child's modules join the pre-fork imports
    assert "json" in devices.child_modules() and __name__ in devices.child_modules()
    # and a bad value is named like any other
    bad = C.build_config(ordered_flags=[("toy", f"vhost={sock_dir}/t.sock,name=t0,level=12")],
                         control_socket=f"{sock_dir}/ctl.sock")
    with pytest.raises(ConfigError, match="device 't0', key 'level', value '12': outside"):
        C.open_builders(bad)


def test_run_flags_come_from_the_registry():
    argv = ["run"]
    for t in DEVICE_TYPES.values():
        argv += [f"--{t.flag}", f"vhost=/run/{t.name}.sock"]
    args = supervisor_cli.build_parser().parse_args(argv)
    assert args.devices == [(t.flag, f"vhost=/run/{t.name}.sock") for t in DEVICE_TYPES.values()]
