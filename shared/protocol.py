"""Names of the values that travel between the server and departments in each round's messages.

Server -> department (per-round config): the round number, the planned number of rounds, how
many departments the round aggregates, and fingerprints of the label set and of the frozen
backbone, so that a department with other labels or another model refuses before training
instead of corrupting the aggregate.
Department -> server (metrics): who it is, what it spent (its new ledger line), how training went.
"""

SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
AGGREGATE_SIZE = "aggregate-size"
LABEL_FINGERPRINT = "label-fingerprint"
BACKBONE_FINGERPRINT = "backbone-fingerprint"
EVALUATION_SPLIT = "split"  # which split a department evaluates on: its test split in the last round
SPLIT_VAL = "val"
SPLIT_TEST = "test"

SECAGG = "secagg"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
SECAGG_MAX_WEIGHT = "secagg-max-weight"

DEPARTMENT = "department"
STATUS = "status"
STATUS_TRAINED = "trained"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_POLICY_REFUSED = "policy-refused"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
BUDGET = "budget"
LEDGER_ENTRY = "ledger-entry"  # the JSON line the department just appended to its ledger
NOISE_MULTIPLIER = "noise-multiplier"
DP_ENABLED = "dp"
STEPS = "steps"
ACCURACY = "accuracy"
REASON = "reason"
OUT_OF_RANGE = "out-of-range"  # values SecAgg+ will clip to +-clipping range (it does so silently)
