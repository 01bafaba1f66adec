"""The targeted scanner against hand-written tricky pages and against prometheus_client's parser."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from epp.metrics.parse import parse_series, scan

# vllm_page (the reference's page shape) lives in ../shared/bench-floor beside the checkout
BENCH_FLOOR = Path(__file__).resolve().parents[3] / "shared" / "bench-floor"
sys.path.insert(0, str(BENCH_FLOOR))


def values(page: str | bytes, name: str, **kw: bool) -> list[tuple[dict[str, str], float, float | None]]:
    return [(dict(s.labels), s.value, s.timestamp) for s in scan(page, [name], **kw).get(name, [])]


def test_simple_and_several_series_per_name() -> None:
    page = (
        "# HELP q Queue.\n# TYPE q gauge\n"
        'q{model="a"} 3\n'
        'q{model="b"} 4.5\n'
        "other 1\n"
    )
    assert values(page, "q") == [({"model": "a"}, 3.0, None), ({"model": "b"}, 4.5, None)]


def test_only_requested_names_and_missing_names_absent() -> None:
    page = "a 1\nb 2\nc 3\n"
    assert set(scan(page, ["b", "zzz"])) == {"b"}
    assert values(page, "b") == [({}, 2.0, None)]


def test_no_labels_and_empty_braces() -> None:
    page = "x 1\ny{} 2\n"
    assert values(page, "x") == [({}, 1.0, None)]
    assert values(page, "y") == [({}, 2.0, None)]


def test_escaped_quotes_backslashes_commas_braces_in_label_values() -> None:
    page = (
        'm{a="say \\"hi\\", then go",b="C:\\\\dir\\\\",c="x}y{z",d="line1\\nline2",e="=,="} 7\n'
    )
    assert values(page, "m") == [
        ({"a": 'say "hi", then go', "b": "C:\\dir\\", "c": "x}y{z", "d": "line1\nline2", "e": "=,="}, 7.0, None)
    ]


def test_backslash_before_closing_quote() -> None:
    # "a\\" is the value a\ ; the quote after the two backslashes closes it
    page = 'm{p="a\\\\",q="b"} 1\n'
    assert values(page, "m") == [({"p": "a\\", "q": "b"}, 1.0, None)]


def test_special_values() -> None:
    page = "a NaN\nb +Inf\nc -Inf\nd 1e-3\ne -0.5\nf Inf\n"
    found = scan(page, ["a", "b", "c", "d", "e", "f"])
    assert math.isnan(found["a"][0].value)
    assert found["b"][0].value == math.inf
    assert found["c"][0].value == -math.inf
    assert found["d"][0].value == 0.001
    assert found["e"][0].value == -0.5
    assert found["f"][0].value == math.inf


def test_timestamps() -> None:
    page = 'a{x="1"} 5 1700000000123\nb 6\n'
    assert values(page, "a") == [({"x": "1"}, 5.0, 1700000000.123)]
    assert values(page, "b") == [({}, 6.0, None)]


def test_comments_help_type_lines_do_not_count() -> None:
    page = (
        "# HELP q q is a gauge, see q{a=\"1\"} 99\n"
        "# TYPE q gauge\n"
        "# q 42 (a comment that looks like a sample)\n"
        "q 1\n"
    )
    assert values(page, "q") == [({}, 1.0, None)]


def test_crlf_line_endings() -> None:
    page = '# HELP q x\r\n# TYPE q gauge\r\nq{m="a"} 2\r\nq{m="b"} 3 1000\r\nr 4\r\n'
    assert values(page, "q") == [({"m": "a"}, 2.0, None), ({"m": "b"}, 3.0, 1.0)]
    assert values(page, "r") == [({}, 4.0, None)]


def test_truncated_page_keeps_complete_lines() -> None:
    page = 'q{m="a"} 2\nq{m="b"} 3\nq{m="c"} 12'  # the last line stops mid-number
    assert values(page, "q") == [({"m": "a"}, 2.0, None), ({"m": "b"}, 3.0, None)]
    assert values('q{m="a"} 2\nq{m="b', "q") == [({"m": "a"}, 2.0, None)]
    assert scan("q 1", ["q"]) == {}  # no complete line at all
    assert scan("", ["q"]) == {}


def test_name_prefixes_and_suffixes_do_not_match() -> None:
    page = "q_total 1\nxq 2\nq 3\nq_bucket{le=\"1\"} 4\n"
    assert values(page, "q") == [({}, 3.0, None)]


def test_name_inside_label_value_is_not_a_line() -> None:
    page = 'other{help="\\nq 5"} 1\nother{v=" q 6"} 1\nq 7\n'
    assert values(page, "q") == [({}, 7.0, None)]


def test_first_line_of_page_and_leading_blanks() -> None:
    assert values("q 1\n", "q") == [({}, 1.0, None)]
    page = "# TYPE q gauge\n  q{a=\"1\"} 1\n\tq{a=\"2\"} 2\n"
    assert values(page, "q") == [({"a": "1"}, 1.0, None), ({"a": "2"}, 2.0, None)]


def test_blanks_between_tokens_and_trailing_comma() -> None:
    page = 'q {a = "1" , b="2",} \t 3   4000 \n'
    assert values(page, "q") == [({"a": "1", "b": "2"}, 3.0, 4.0)]


def test_malformed_lines_are_skipped_not_fatal() -> None:
    page = (
        'q{a="1"} 1\n'
        'q{a="unterminated} 2\n'
        'q{a="1"b="2"} 3\n'  # missing comma
        'q{a="1",a="2"} 4\n'  # duplicate label
        'q{1a="x"} 5\n'  # bad label name
        "q not-a-number\n"
        "q 1_000\n"  # underscores are not in the format
        "q 1 2 3\n"
        "q\n"
        'q{a="2"} 6\n'
    )
    assert values(page, "q") == [({"a": "1"}, 1.0, None), ({"a": "2"}, 6.0, None)]


def test_grouped_stops_at_next_family_ungrouped_reads_stray_lines() -> None:
    page = "# TYPE q gauge\nq 1\n# comment inside group\nq 2\n# TYPE r gauge\nr 0\nq 3\n"
    assert [v for _, v, _ in values(page, "q")] == [1.0, 2.0]
    assert [v for _, v, _ in values(page, "q", grouped=False)] == [1.0, 2.0, 3.0]


def test_bytes_and_invalid_utf8() -> None:
    page = 'q{m="caf\xc3\xa9"} 1\nr{m="\xff"} 2\n'.encode("latin-1")
    assert values(page, "q") == [({"m": "café"}, 1.0, None)]
    assert values(page, "r")[0][1] == 2.0


def test_labels_are_read_only_and_shared() -> None:
    a = scan('q{m="a"} 1\n', ["q"])["q"][0]
    b = scan('q{m="a"} 2\n', ["q"])["q"][0]
    assert a.labels is b.labels  # cached by label text
    with pytest.raises(TypeError):
        a.labels["m"] = "b"  # type: ignore[index]


def test_parse_series_direct() -> None:
    assert parse_series(' 1') is not None
    assert parse_series('1') is None  # name glued to the value
    assert parse_series('{a="1"} 1 }') is None


@pytest.mark.skipif(not (BENCH_FLOOR / "vllm_page.py").exists(), reason="../shared/bench-floor not present")
def test_vllm_page_matches_prometheus_client() -> None:
    import vllm_page

    page = vllm_page.page(seed=3)
    names = ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
             "vllm:cache_config_info", "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total"]
    assert reference(page, names) == ours(page, names)


# ---- agreement with prometheus_client on generated pages ------------------------------------


def reference(page: str, names: list[str]) -> dict[str, list[tuple[tuple[tuple[str, str], ...], str, float | None]]]:
    out: dict[str, list[tuple[tuple[tuple[str, str], ...], str, float | None]]] = {}
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            if s.name in names:
                out.setdefault(s.name, []).append((tuple(sorted(s.labels.items())), repr(float(s.value)), s.timestamp))
    return out


def ours(page: str, names: list[str]) -> dict[str, list[tuple[tuple[tuple[str, str], ...], str, float | None]]]:
    return {
        n: [(tuple(sorted(s.labels.items())), repr(s.value), s.timestamp) for s in series]
        for n, series in scan(page, names).items()
    }


metric_names = st.from_regex(r"[a-z][a-z0-9_:]{0,12}", fullmatch=True)
label_names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,8}", fullmatch=True)  # "__" names are reserved
label_values = st.lists(
    st.sampled_from([*'ab ,={}"\\\n#\té€', "\\n", '\\"', "\\\\"]), max_size=8
).map("".join)
sample_values = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: "NaN" if math.isnan(f) else "+Inf" if f == math.inf else "-Inf" if f == -math.inf else repr(f)
    ),
)
timestamps = st.one_of(st.none(), st.integers(0, 2 * 10**12))


def escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def families(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(metric_names)
    typ = draw(st.sampled_from(["gauge", "untyped", None]))
    lines = []
    if draw(st.booleans()):
        doc = escape(draw(st.text(alphabet='ab {}"=,', max_size=10)))
        lines.append(f"# HELP {name} {doc}")
    if typ:
        lines.append(f"# TYPE {name} {typ}")
    for _ in range(draw(st.integers(1, 3))):
        names = draw(st.lists(label_names, max_size=3, unique=True))
        labels = ",".join(f'{k}{draw(st.sampled_from(["=", " = "]))}"{escape(draw(label_values))}"' for k in names)
        if labels and draw(st.booleans()):
            labels += ","
        brace = f"{{{labels}}}" if names or draw(st.booleans()) else ""
        ts = draw(timestamps)
        sep = draw(st.sampled_from([" ", "  "]))
        lines.append(f"{name}{brace}{sep}{draw(sample_values)}" + (f" {ts}" if ts is not None else ""))
    if draw(st.booleans()):
        lines.append("# just a comment")
    return name, "\n".join(lines)


@st.composite
def pages(draw: st.DrawFn) -> tuple[str, list[str]]:
    fams = draw(st.lists(families(), min_size=1, max_size=6, unique_by=lambda f: f[0]))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(body for _, body in fams) + eol
    if eol == "\r\n":
        text = text.replace("\n", "\r\n").replace("\r\r\n", "\r\n")
    wanted = [n for n, _ in fams if draw(st.booleans())] + draw(st.lists(metric_names, max_size=2))
    return text, wanted


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages())
def test_agrees_with_prometheus_client(case: tuple[str, list[str]]) -> None:
    text, wanted = case
    names = list(dict.fromkeys(wanted))
    assert ours(text, names) == reference(text, names)


@settings(max_examples=60, deadline=None)
@given(pages(), st.integers(min_value=1))
def test_truncated_generated_page_is_a_prefix_of_the_full_result(case: tuple[str, list[str]], cut: int) -> None:
    text, wanted = case
    cut_at = cut % len(text)
    full = ours(text, wanted)
    partial = ours(text[:cut_at], wanted)
    for name, series in partial.items():
        assert series == full[name][: len(series)]


def test_series_cap_bounds_the_parse_cost() -> None:
    from epp.metrics.parse import TooManySeries

    page = "".join(f'x{{i="{i}"}} 1\n' for i in range(101))
    assert len(scan(page, ["x"], max_series=101)["x"]) == 101
    with pytest.raises(TooManySeries):
        scan(page, ["x"], max_series=100)
    assert scan(page, ["y"], max_series=1) == {}  # names not asked for cost nothing
