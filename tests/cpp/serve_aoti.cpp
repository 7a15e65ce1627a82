// Serves an AOTInductor package whose graph calls the sae_kernels ops, without Python:
// loading the kernels' library registers the ops (schemas and kernels) with the dispatcher.
//
//   serve_aoti PACKAGE.pt2 LIBRARY.so N C H W
//
// runs the package on x = ones and identity = zeros of shape (N, C, H, W) and prints the
// output's shape and sum.

#include <dlfcn.h>

#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: serve_aoti PACKAGE.pt2 LIBRARY.so N C H W\n";
    return 2;
  }
  if (!dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << dlerror() << "\n";
    return 1;
  }
  std::vector<int64_t> shape;
  for (int i = 3; i < 7; ++i) shape.push_back(std::atol(argv[i]));
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<torch::Tensor> outputs = loader.run({torch::ones(shape), torch::zeros(shape)});
  std::cout << outputs[0].sizes() << " " << std::setprecision(17)
            << outputs[0].sum().item<double>() << "\n";
  return 0;
}
