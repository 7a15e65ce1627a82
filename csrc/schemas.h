// The operators' schemas (namespace sae_kernels), one SAE_SCHEMA(...) each: the one list
// that sae_kernels/kernels/cpu.py defines at import and register.cpp defines in a process
// where Python has not (a C++ program serving a saved graph).
//
//   fc1_weights  the branch matrices (the rows of the stacked W1); fc1_biases: none or one each
//   fc2_weight   None: the single-FC form (fc1 is C x C, u = p)
//   prologue_*   x' = prologue_act(x * prologue_scale + prologue_shift) takes x's place
//   act, gate, prologue_act: indices into options.ACTIVATIONS, GATES, PROLOGUE_ACTIVATIONS
//
// cpu_sae       the differentiable operator, returns y
// cpu_sae_      cpu_sae with y written over x (returns nothing), where no gradient is due:
//               for callers whose x is a temporary that nothing reads afterwards
// cpu_forward   y and what the backward reads: z (N, C), p (N, K), u (N, C)
// cpu_backward  dx, d_identity, the weight and bias gradients, the prologue's; a gradient
//               that was not asked for is an empty tensor
// cpu_excite    s = gate(W2 act(W1 z + b1) + b2) (N, C) for pooled means z (N, C), in z's
//               dtype: the FC stage alone, for graphs that pool and rescale themselves
// cpu_copy_like_output  x copied into an output allocated as the operator's are
// cpu_isa       the instruction set the kernels run with
//
// Both places define every op with the flexible_layout tag: the kernels read each tensor
// through its strides and return y in x's layout, so torch.compile need not copy a
// channels_last convolution's output to NCHW before the op, and back after it.

SAE_SCHEMA("cpu_sae(Tensor x, Tensor[] fc1_weights, Tensor[] fc1_biases, Tensor? fc2_weight, "
           "Tensor? fc2_bias, Tensor? identity, int act, int gate, bool residual, "
           "bool relu_out, Tensor? prologue_scale=None, Tensor? prologue_shift=None, "
           "int prologue_act=0) -> Tensor")
SAE_SCHEMA("cpu_sae_(Tensor(a!) x, Tensor[] fc1_weights, Tensor[] fc1_biases, "
           "Tensor? fc2_weight, Tensor? fc2_bias, Tensor? identity, int act, int gate, "
           "bool residual, bool relu_out, Tensor? prologue_scale=None, "
           "Tensor? prologue_shift=None, int prologue_act=0) -> ()")
SAE_SCHEMA("cpu_forward(Tensor x, Tensor[] fc1_weights, Tensor[] fc1_biases, "
           "Tensor? fc2_weight, Tensor? fc2_bias, Tensor? identity, int act, int gate, "
           "bool residual, bool relu_out, Tensor? prologue_scale=None, "
           "Tensor? prologue_shift=None, int prologue_act=0) "
           "-> (Tensor, Tensor, Tensor, Tensor)")
SAE_SCHEMA("cpu_backward(Tensor grad, Tensor x, Tensor? y, Tensor[] fc1_weights, "
           "Tensor? fc2_weight, Tensor z, Tensor p, Tensor u, int act, int gate, "
           "bool residual, bool relu_out, bool has_identity, Tensor? prologue_scale=None, "
           "Tensor? prologue_shift=None, int prologue_act=0, bool prologue_grads=False) "
           "-> (Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor, Tensor, Tensor)")
SAE_SCHEMA("cpu_excite(Tensor z, Tensor[] fc1_weights, Tensor[] fc1_biases, "
           "Tensor? fc2_weight, Tensor? fc2_bias, int act, int gate) -> Tensor")
SAE_SCHEMA("cpu_copy_like_output(Tensor x) -> Tensor")
SAE_SCHEMA("cpu_isa() -> str")
