"""Default step-scorer weights (conditional logit, L2=1.0), fitted by benchmarks/attribution_fit.py on
all records of algorithm_generated.jsonl (sha256 e97ea8f04ebea406...). Generated file: refit instead of editing.
Reported accuracies never use these: `kvmas attribute eval` refits on training folds only.
"""

DEFAULT_WEIGHTS = {'pos0': -0.823784, 'pos1': 0.501298, 'pos2': -0.049022, 'pos3': 0.103156, 'pos4plus': 0.268351, 'rel_pos': -0.282775, 'terminal': -1.367571, 'terminate': -0.631605, 'first_turn': 0.217874, 'majority_agent': -0.018801, 'first_speaker': 0.560541, 'code': 0.459655, 'next_exec_error': 0.529611, 'next_exec_ok': 0.043283, 'reads_exec_error': -0.365736, 'introduces_answer': 0.842325, 'reach': 0.33155, 'reaches_outcome': 0.871534, 'new_values': 0.13202, 'assume_cue': 0.71127, 'verify_cue': 0.399136, 'plan_cue': 0.132751, 'length': 0.57553}

DEFAULT_WEIGHTS_GT = {'pos0': -0.814395, 'pos1': 0.503116, 'pos2': -0.058157, 'pos3': 0.09995, 'pos4plus': 0.269486, 'rel_pos': -0.291957, 'terminal': -1.338845, 'terminate': -0.619513, 'first_turn': 0.219163, 'majority_agent': -0.02814, 'first_speaker': 0.558274, 'code': 0.460037, 'next_exec_error': 0.530964, 'next_exec_ok': 0.040322, 'reads_exec_error': -0.35862, 'introduces_answer': 0.835603, 'reach': 0.341215, 'reaches_outcome': 0.859052, 'new_values': 0.126597, 'assume_cue': 0.69848, 'verify_cue': 0.388036, 'plan_cue': 0.143436, 'length': 0.531127, 'gt_in_step': 0.511968, 'gt_seen_before': -0.103686, 'gt_lost_here': 0.666518}
