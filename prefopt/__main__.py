from prefopt.cli import app

app(prog_name="prefopt")
