// Both lorastack images in one build: `docker buildx bake -f images/docker-bake.hcl [--push]` from the repo root.
// One bake builds the shared `base` stage of images/Dockerfile once and both targets on top of it, with SBOM and
// provenance attestations attached to each pushed image. The inference image carries both engines (the built-in one
// and vLLM's CUDA build in /opt/vllm; LORASTACK_ENGINE picks at start), so a stack switches engine without
// another image; its vLLM layer (~4 GB compressed) is cached apart from pyproject.toml edits (the requirements stage). The images workflow (.github/workflows/images.yml) sets
// REGISTRY, VCS_REF and SOURCE_URL, adds the layer cache (type=gha) and reads the digests from --metadata-file.

variable "REGISTRY" {
  default = "localhost:5000"
}

variable "VERSION" {
  default = "0.1.0"
}

variable "VCS_REF" {
  default = "unknown"
}

variable "SOURCE_URL" {
  default = ""
}

// "false" for a build that is not pushed (pull requests): attestations need an image to attach to.
variable "ATTEST" {
  default = "true"
}

group "default" {
  targets = ["trainer", "inference"]
}

target "_common" {
  context    = "."
  dockerfile = "images/Dockerfile"
  platforms  = ["linux/amd64"]
  args = {
    VERSION    = VERSION
    VCS_REF    = VCS_REF
    SOURCE_URL = SOURCE_URL
  }
  attest = ATTEST == "true" ? [
    "type=provenance,mode=max",
    "type=sbom",
  ] : []
}

// The tag is for people browsing the registry; stack files reference the digest (ci/pin_images.py).
target "trainer" {
  inherits = ["_common"]
  target   = "trainer"
  tags     = ["${REGISTRY}/lorastack-trainer:${VCS_REF}"]
}

target "inference" {
  inherits = ["_common"]
  target   = "inference"
  tags     = ["${REGISTRY}/lorastack-inference:${VCS_REF}"]
}
