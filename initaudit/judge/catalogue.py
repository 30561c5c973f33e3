"""The facts a rule's conditions may name, with what each means (`initaudit rules --facts` prints them); every
one of them is made by `facts.py` beside this file, and a test holds the two equal."""

# The facts of each name of a near-tie (scheme, scheme_family, scheme_gain, scheme_fan, implied_std): not a
# condition's fact, but what Rule.verdict judges each name by.
ALTERNATIVES = "scheme_alternatives"

# Every fact a condition may name (made by judge/facts.py), with what it means: printed by `initaudit rules --facts`.
FACTS = {
    "layer": "the layer's name", "tensor": "the tensor's name", "role": "weight, bias, norm_weight, ...",
    "kind": "linear, conv2d, embedding, norm, recurrent, attention, parameter...", "module_type": "class name",
    "activation": "the activation that follows (relu, tanh, identity, unknown...)",
    "activation_family": "relu (ReLU-like), saturating (tanh/sigmoid), selu, identity, unknown",
    "norm_after": "a normalization follows before the activation", "position": "index among weighted layers",
    "residual_after": "the output joins a residual sum, as its branch (not its shortcut), before the next layer",
    "gate_after": "the activation after the layer is a gate: its output scales a signal the layer did not compute "
                  "(squeeze-excite); the run ends there",
    "residual_branch": "the output joins a residual sum, through any layers, before a normalization, as its branch "
                       "(the layer sits on a residual branch: not on the shortcut, nor before the summands part)",
    "depth": "weighted layers in the model", "run_depth": "weighted layers in this layer's run between norms",
    "is_output": "the model's last layer, linear", "fan_in": "fan in", "fan_out": "fan out",
    "order_known": "the layer's place in the forward order is known (a bare file's names and shapes can leave it"
                   " ambiguous: then norm_after, run_depth, position and is_output are guesses)",
    "norm_folded": "an exporter folded a BatchNorm into the weights (ONNX): its scale, a zero-init residual's 0 "
                   "too, is in them",
    "folded_in": "where a BatchNorm was folded into the weights, the words naming it as a zero's possible cause "
                 "(empty otherwise)",
    "numel": "entries", "units": "output units", "non_finite": "NaN + Inf count", "nan": "NaN count",
    "inf": "Inf count", "mean": "mean", "std": "standard deviation", "min": "minimum", "max": "maximum",
    "effective_scale": "the constant the forward pass multiplies a layer's weight (or its pre-activation) by: "
                       "equalized learning rate, SIREN's ω0, a scale in a buffer or attribute (1 where none); "
                       "mean, std, min, max, abs_max and the fingerprint are of the weight times it",
    "stored_std": "the standard deviation of the tensor as stored (std is of the effective weight)",
    "std_label": "how a message names the std: 'std', or 'effective std (stored std … × …)'",
    "abs_max": "largest |value|", "kurtosis": "excess kurtosis", "zero_fraction": "fraction of entries equal to 0",
    "distinct": "distinct values", "constant": "all finite entries equal", "value": "the constant value",
    "zero_units": "units whose weights are all 0", "dead_units": "zero units whose bias is <= 0 (or absent)",
    "dead_unit_list": "the first dead units", "duplicate_units": "units repeating another one",
    "duplicate_groups": "groups of identical units",
    "duplicate_fraction": "duplicate_units / units", "duplicate_example": "the first group",
    "scheme": "the fingerprinted init scheme", "scheme_family": "kaiming, xavier, lecun, torch-default, fixed...",
    "scheme_gain": "the calculate_gain nonlinearity of the fingerprinted scheme: linear (1), relu (√2), tanh (5/3), "
                   "selu (3/4); empty for fixed stds, defaults and orthogonal",
    "scheme_fan": "the fan mode of the fingerprinted scheme: fan_in, fan_out, both (Xavier) or empty",
    "scheme_ambiguous": "the fingerprint is a near-tie of several schemes (scheme 'a|b'); a condition on the scheme "
                        "facts fires at its severity only when it holds for every name, at info when for some",
    "implied_std": "the std the fingerprinted scheme implies", "expected_scheme": "the recommended scheme",
    "expected_std": "the recommended scheme's std", "std_ratio": "std / expected_std",
    "variance_gain": "std_ratio squared: the per-layer forward variance gain relative to a variance-preserving init",
    "expected_call": "the torch.nn.init call that draws the recommended scheme", "shared": "tied to another tensor",
    "recipe_share": "share of the model's weighted layers drawn with a fixed std (0 unless this one is too)",
    "is_last": "the last weighted layer in forward order, whatever follows it",
    "bias_ratio": "the bias's RMS over the weights' share of a unit-RMS input's output (std·√fan_in): how far "
                  "the layer starts at its bias (None without a bias)",
    "bias_recipe": "the published recipe a non-zero bias follows (a constant bias; an LSTM's forget-gate bias, gate "
                   "biases set gate by gate), else None",
    "bias_reading": "a non-zero bias in words: its largest |b| and the recipe it follows, or the guide's zero",
    "envelope_ratio": "std / the nearest edge of the stds any common scheme gives this layer, whatever its "
                      "activation (1 inside)",
    "state": "the weights as rules see them: fresh, trained or unknown (the layer's own verdict; every layer of a "
             "trained model; --state overrides)",
    "layer_state": "this layer's own verdict: fresh (fits an iid init draw), trained (does not) or unknown (too few values)",
    "dead_fraction": "dead_units / units",
    "peak_share": "the share of the tensor's squared deviations from its mean held by its largest entry",
    "spike_ratio": "the largest entry's distance from the mean in standard deviations of all the other entries",
    "edge_values": "entries exactly on a truncation bound (±2 absolute, a symmetric repeated clamp, or 2σ) beyond what "
                   "the draw's density puts on that value at the dtype's resolution (0 when none)",
    "edge_bound": "the magnitude of that truncation bound",
    "edge_allowance": "the most entries a correct draw leaves on the bound: its density there, its Poisson spread and "
                      "the handful float rounding adds (trunc_normal_ lands on a bound when its uniform draw hits an end)",
    "edge_pile": "edge_values beyond edge_allowance: a pile on the bound no correct draw leaves",
    "edge_peak": "the largest |value| is on that truncation bound",
    "substantial_duplicate_units": "duplicate units whose norm is not negligible (not weight decay's near-zeros)",
    "predicted_gain": "fan_in·E[w²]·the activation's second-moment factor at the layer's operating point (initaudit.depth)",
    "predicted_scale": "RMS of the layer's output relative to the input's, predicted (or measured, by probe) through depth",
    "predicted_grad_scale": "RMS of the loss gradient at the layer's output relative to the output's, through depth",
    "signal_exit": "vanishing/exploding where the forward scale leaves the signal band at this layer, else none",
    "gradient_exit": "vanishing/exploding where the gradient's scale, going back, leaves the signal band here",
    "stream_exit": "exploding on the branch end whose residual sum takes the residual stream (sums with no "
                   "normalization between them) out of the signal band while its second moment grows by 1.1x or "
                   "more per block (fitted over the last 4 blocks): exponential in depth, not a pre-norm's additive "
                   "growth",
    "stream_growth": "the residual stream's per-block growth factor of its second moment at the sum this layer "
                     "joins, fitted over the last 4 blocks (None off a stream or before 5 sums)",
    "signal_detail": "what the depth analysis found at this layer, in words",
    "norm_convention": "a norm's gain convention: one_plus (x·(1+w), Gemma's RMSNorm: zero is its identity, read from "
                       "the module's forward), scale (x·w), unknown (no module to read, and an RMSNorm's keys, a "
                       "weight alone, which both share); none for other layers",
    "signal_dead": "measured (probe): the layer's output is all zeros or all its units are dead, and every layer "
                   "after it puts out the same for every input",
    "cosine": "measured (probe): the mean cosine between different inputs' outputs of the layer (1: every input "
              "mapped to one direction; none in check, or where an output is all zero)",
    "input_cosine": "measured (probe): the batch's own mean cosine between samples, over its floating inputs (about "
                    "0 for the synthetic batch's independent draws; none for token ids)",
    "spread_kept": "measured (probe): (1 − cosine) / (1 − input_cosine): the share of the inputs' spread in "
                   "direction the layer's output keeps (0: all inputs collapsed to one direction)",
    "last_hidden": "measured (probe): the layer whose output the head reads: the last layer, in forward order, of "
                   "the deep plain runs the signal rules judge (5+ weighted layers, no norm or residual sum "
                   "between them) that is not the output",
    "input_batch": "probe's batch: synthetic (seeded independent draws) or given (--input-batch)",
    "in_flow": "a norm the model's flow names, so whether its output joins a residual sum (residual_branch) is "
               "known; false for weighted layers and for norms no flow names",
    "zero_in_every_block": "all zero, as is the same tensor of another numbered sibling block (2 or more in all), "
                           "each of which holds a live tensor of the same role, and the next layer of its block does not "
                           "take its output in: Fixup's, SkipInit's, zero_init_residual's and adaLN-zero's zero at each "
                           "block's end (what a bare file shows of them), not a zeroed squeeze-excite fc1 before its fc2; "
                           "also a lone zero whose path ends as theirs (DiT's final_layer.adaLN_modulation)",
    "feeds_zero": "every weighted layer the output reaches first (through no other layer) is all zero and none is an "
                  "output: its scale reaches no signal at init (adaLN-zero's timestep MLP feeds only the zero "
                  "modulations); false without a flow that sees the activations",
    "origin": "predicted (check: from the weights) or measured (probe: a forward and backward pass)",
    "torch_fan_mistake": "a transposed conv drawn with Kaiming/LeCun at torch's fan (weight dim 1: out·k) where the "
                         "signal sees a different one (in·k/stride²)",
    "fan_note": "words on the fan the std was judged at, where it is not torch's (a transposed conv), else empty",
    "snn_band": "below/above where a SELU layer's fan_in·E[w²] is outside the SNN paper's stable band [0.95, 1.1] "
                "beyond 3 standard errors of its estimate, else inside (none for other activations)",
    "expected_state": "the state the user declared for the layer (expect: trained or fresh), else undeclared",
    "model_trained_share": "the share of the model's classified weight values in layers seen trained",
    "siblings_trained": "the share of the same layer in the other blocks (3 or more) seen trained; none without",
    "recipe": "the init recipe declared for the tensor (config file or the model's config), e.g. normal(0.02)",
    "recipe_source": "where the recipe is declared: [tool.initaudit] recipe, or the model family's own init",
    "recipe_fits": "the tensor fits its declared recipe (shape and std within sampling error); none without one",
    "recipe_contradiction": "how the tensor contradicts its declared recipe, in words",
    "tie_broken_with": "the tensor a declared tie links this one to, where the two are not one tensor (live: not one "
                       "Parameter; in a file: different values)",
    "tie_declared_by": "what declares that tie: config (the config's tie_word_embeddings, through the architecture's "
                       "tied-weights map) or copy (a live head holding a bitwise copy of an embedding table)",
    "tie_values_equal": "the two tensors of a broken tie still hold equal values",
    "sibling_ratio": "std / the std the layer's sibling blocks give its block (the best-fitting depth recipe)",
    "sibling_recipe": "the depth recipe fitted across the sibling blocks: constant, ∝ 1/√(l+1) or ∝ 1/(l+1)",
    "sibling_expected_std": "the std the sibling blocks' recipe gives this block",
    "sibling_off": "the std departs from the sibling blocks' recipe beyond sampling error (6 standard errors) and 10 %",
    "siblings": "blocks that repeat this layer (fitted together)",
    "sibling_off_layers": "the layers of this group that depart from the recipe",
    "identical_to": "the first of the same-shaped random weights bitwise identical to this one (set on the others)",
    "identical_count": "how many weights hold these identical values (set where identical_to is)",
    "convention": "the published convention of the family the tensor belongs to, where one is known (a Mamba/SSM "
                  "mixer's A_log, D, dt bias and dt_proj weight, told by their names; an offset norm's gain, where "
                  "norm_convention is one_plus), else none",
    "convention_fits": "the tensor fits its family's convention; false where it contradicts it; none without one (or "
                       "where the values say nothing of it: a D that is not all ones)",
    "convention_contradiction": "how the tensor contradicts its family's convention, in words",
    "mean_resized_rows": "trailing units equal to the mean of the units before them: the rows transformers' "
                         "resize_token_embeddings appends by mean-resizing (0 without)",
    "duplicates_mean_resized": "the only repeated units are the rows appended by mean-resizing",
    "flow_seen": "the model's data flow was read (a module, TorchScript, ONNX, a config-built architecture): its "
                 "activations and residual sums are known, not guessed from a bare file's names and order",
    "subnormal_share": "share of the finite entries that are subnormal (denormal) in the tensor's dtype",
    "subnormal_excess": "the share of subnormal entries beyond 10x what a normal at the tensor's mean and std "
                        "predicts for its dtype, and beyond 4 standard errors (0 for an init draw, fp16 too)",
    "magnitude_decades": "log10 of the 90th percentile over the median of the nonzero |values| (a normal draw: 0.39)",
    "huge_share": "share of the finite entries beyond 1e6 in magnitude",
    "median_magnitude": "the median nonzero |value|",
    "pile_share": "share of the finite entries on the most common value 8 robust stds or more from the median of "
                  "the nonzero values (at least 8 entries of the sample; on the min or max only with a gap of a robust std "
                  "to the other values: else a truncation bound's), else 0",
    "pile_value": "the value pile_share counts, else none",
    "width_slope": "probe --widths: the largest slope, over the measured steps t (after the optimizer steps; at init "
                   "without any), of log(mean |output|) against log(width), seeds averaged (None outside a sweep, or "
                   "where the output is 0 at some width)",
    "width_growth": "the mean |output| at the widest width over the narrowest's, at that t",
    "width_t": "the step t of width_slope (mup's t: 1 at init, t after t-1 optimizer steps)",
    "width_count": "how many widths the sweep measured",
    "width_range": "the narrowest and widest widths, in words",
    "update_ratio": "probe --steps: the largest ||W_t - W_(t-1)|| / ||W_0|| of one optimizer step (over the widths "
                    "and steps, seeds averaged); a weight that starts at zero is measured against the norm its "
                    "recommended init would have (expected_std·√numel)",
    "update_width": "the width of update_ratio",
    "sign_step_ratio": "what one sign step (Adam's first: lr·sign(g) on every entry) gives the weight at its "
                       "optimizer group's learning rate: lr·√numel over the same reference norm",
    "update_optimizer": "the optimizer and learning rate of the steps, in words",
}
