"""What the command-line tests share: running `pmap` in-process and reading its output."""
from typer.testing import CliRunner

from pmap.cli import app


def invoke(*args, input=None, env=None):
    """Run `pmap ARGS` in this process; an exception other than the exit is raised, not hidden."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def lines(text):
    return text.splitlines()
