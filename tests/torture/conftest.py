"""The torture runs' summaries, printed at the end of the session (and the
seed of a failed run in its failure)."""

SUMMARIES = []


def pytest_terminal_summary(terminalreporter):
    for title, lines in SUMMARIES:
        terminalreporter.write_sep("=", title)
        for line in lines:
            terminalreporter.write_line(line)
