# The two commands of the README.
#   make run    run modvisord with the example modules (embedded default: no systemd, no system bus)
#   make test   install what the tests need, bring up the testbed, run every check and test
.PHONY: run test build clean

run:
	scripts/run.sh

test:
	scripts/test.sh

build:
	cargo build --release --locked

clean:
	cargo clean
