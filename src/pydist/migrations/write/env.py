from pydist.migrations.env_common import run

run()
