from inpo.cli import entry

entry()
