"""Names of the values that travel between the server and departments in each round's messages.

Server -> department (per-round config): the round number, the planned number of rounds, how
many departments the round aggregates, and fingerprints of the label set and of the frozen
backbone, so that a department with other labels or another model refuses before training
instead of corrupting the aggregate.
Department -> server (metrics): who it is, what it spent (its new ledger line), how training went.
"""

SERVER_ROUND = "server-round"
STAGE = "stage"  # what a round asks for: a class-statistics release (stage 1) or DP-SGD training
STAGE_STATISTICS = "class-statistics"
STAGE_DP_SGD = "dp-sgd"
NUM_ROUNDS = "num-rounds"
AGGREGATE_SIZE = "aggregate-size"
LABEL_FINGERPRINT = "label-fingerprint"
BACKBONE_FINGERPRINT = "backbone-fingerprint"
EVALUATION_SPLIT = "split"  # which split a department evaluates on: its test split in the last round
SPLIT_VAL = "val"
SPLIT_TEST = "test"

LEDGER_INDEXES = "ledger-indexes"  # JSON: department file name -> last ledger index the server holds

SECAGG = "secagg"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_MASKS = "secagg-masks"  # the mask generator the server unmasks with (shared.secagg_masks.NAME)

DEPARTMENT = "department"
STATUS = "status"
STATUS_TRAINED = "trained"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_POLICY_REFUSED = "policy-refused"
STATUS_REJECTED = "rejected"  # the server left the update out: not finite, out of range or overweight
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
BUDGET = "budget"
LEDGER_ENTRY = "ledger-entry"  # the JSON lines (one per mechanism) the department just appended to its ledger
RELEASED_LABELS = "released-labels"  # stage 1: how many labels' sums a department released (a DP output)
NOISE_MULTIPLIER = "noise-multiplier"
DP_ENABLED = "dp"
STEPS = "steps"
SIGNATURE = "signature"  # deployment: the department's signature of its reply (shared.reply_signature)
ACCURACY = "accuracy"
EVALUATION_WITHHELD = "evaluation-withheld"  # under DP a department sends no evaluation numbers
REASON = "reason"
OUT_OF_RANGE = "out-of-range"  # values SecAgg+ will clip to +-clipping range (it does so silently)
