# Convenience targets; the README's two commands are the scripts themselves.
.PHONY: run test
run:
	bash scripts/run.sh
test:
	bash scripts/test.sh
