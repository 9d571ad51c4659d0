"""The blocks a stage declares for the report, drawn by report.py: escaped, formatted, one section."""

from selfalign.core.report import render_section
from selfalign.core.report_api import (
    Bold,
    Chart,
    Code,
    Facts,
    Heading,
    Items,
    Muted,
    Section,
    Series,
    Table,
    Text,
    read_rows,
    short,
    wall_time,
)


def test_a_declared_section_is_drawn_with_everything_escaped():
    anchor, title, html = render_section(Section("stage-x", "X <1>", [
        Heading("Funnel"),
        Text(["kept ", Bold(3), " of <4> ", Muted("(one <b>not</b> kept)"), " in ", Code("a/b")]),
        Table(["step", "pairs", "share"], [["raw <pairs>", 4, 0.5], ["kept", 3, None], ["best", Bold(2), 0.123456]]),
        Facts([("teacher", "tiny<llama>"), ("unset", None)]),
        Items("Some", ["a<b", ("c", "(note)")]),
    ]))
    assert (anchor, title) == ("stage-x", "X <1>")
    assert html.startswith('<section id="stage-x"><h2>X &lt;1&gt;</h2><h3>Funnel</h3>')
    assert ('<p>kept <b>3</b> of &lt;4&gt; <span class="muted">(one &lt;b&gt;not&lt;/b&gt; kept)</span> '
            'in <code>a/b</code></p>') in html
    assert '<th>step</th><th class="num">pairs</th><th class="num">share</th>' in html  # numbers right-aligned
    assert '<td>raw &lt;pairs&gt;</td><td class="num">4</td><td class="num">0.500</td>' in html
    assert '<td class="num">—</td>' in html and '<td class="num"><b>2</b></td><td class="num">0.123</td>' in html
    assert '<div class="fact"><b>teacher</b>tiny&lt;llama&gt;</div>' in html and "unset" not in html
    assert '<li>a&lt;b</li><li>c <span class="muted">(note)</span></li>' in html


def test_charts_are_inlined_images():
    line = Chart("line", [Series("ranked", [4, 16], [0.6, 0.7]), Series("binary", [4, 16], [0.5, 0.6], dashed=True)],
                 "accuracy <vs> n", log_x=True, xticks=[4, 16], hline=(0.5, "chance"))
    hist = Chart("histogram", [Series("a", [], [0.1, 0.2, 0.4]), Series("b", [], [0.3])], "rewards", mean_lines=True)
    bars = Chart("barh", [Series("after", [], [0.2]), Series("before", [], [0.4])], "kl", grid=False)
    _, _, html = render_section(Section("c", "charts", [line, hist, bars]))
    assert html.count('<img class="chart" alt="') == 3 and 'alt="accuracy &lt;vs&gt; n"' in html
    assert html.count("src=\"data:image/png;base64,") == 3


def test_sample_tables_box_each_cell_and_readers_tolerate_a_half_written_line(tmp_path):
    _, _, html = render_section(Section("s", "s", [Table(["prompt", "answer"], [["q\nmore", Muted("(empty)")]],
                                                         style="samples", first_width="22%")]))
    assert '<table class="samples"><colgroup><col style="width:22%"></colgroup>' in html
    assert (
        '<td><div class="cell">q\nmore</div></td><td><div class="cell"><span class="muted">(empty)</span></div></td>'
        in html
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1}\n{"a": 2')
    assert read_rows(rows) == [{"a": 1}] and read_rows(tmp_path / "none.jsonl") == []
    assert short("a  b\nc " * 30, 10) == "a b c a b…" and wall_time(75) == "1 min 15 s" and wall_time(None) == "—"
