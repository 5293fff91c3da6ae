"""Progress output: live bars on a terminal, a few plain lines in logs and under CI."""
import io

from cmkd_ros.progress import LineProgress, progress_bar, progress_mode


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_about_ten_lines_however_long_the_run(monkeypatch):
    monkeypatch.delenv('CMKD_PROGRESS', raising=False)
    log = io.StringIO()
    bar = progress_bar(1000, 'fskd', stream=log)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix({'loss': f'{1 / (i + 1):.3f}'})
    bar.close()
    bar.close()                                   # closing twice prints nothing more
    lines = log.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith('fskd: 100/1000 steps (10 %)')
    assert lines[-1].startswith('fskd: 1000/1000 steps (100 %)') and 'loss 0.001' in lines[-1]


def test_a_resumed_run_counts_from_where_it_stopped():
    log = io.StringIO()
    bar = LineProgress(100, 'fskd', 'step', initial=40, stream=log)
    for _ in range(60):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith('fskd: 50/100') and len(lines) == 6, lines


def test_mode_follows_the_stream_ci_and_the_override(monkeypatch):
    monkeypatch.delenv('CMKD_PROGRESS', raising=False)
    monkeypatch.delenv('CI', raising=False)
    assert progress_mode(_Tty()) == 'bar' and progress_mode(io.StringIO()) == 'lines'
    monkeypatch.setenv('CI', 'true')
    assert progress_mode(_Tty()) == 'lines'
    monkeypatch.setenv('CMKD_PROGRESS', 'off')
    log = io.StringIO()
    bar = progress_bar(10, 'x', stream=log)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert log.getvalue() == ''
    monkeypatch.setenv('CMKD_PROGRESS', 'bar')
    assert progress_mode(io.StringIO()) == 'bar'
