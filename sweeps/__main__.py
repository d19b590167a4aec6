from sweeps.cli import app

app(prog_name="sweep")
