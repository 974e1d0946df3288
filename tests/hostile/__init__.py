"""The hostile-input cases of issue 10, shared by the CI suite (tests/integration/test_hostile_input.py)
and the benchmark (bench/hostile.py): ``harness`` runs one case against a real agent subprocess and
measures it, ``cases`` holds the inputs and what the agent must do with them."""
