-- The fake cluster's stand-in for ALCF's `frameworks` module (2025.3.1, in the Aurora PE): what
-- a Parsl block must follow of it. Its own Python goes first on PATH, and it sets the GPU
-- hierarchy and the oneAPI device selector as ALCF's does (../shared/reference/aurora-facts.md,
-- "Python at scale").
help([[Python for GPU work (a stand-in: this machine's python3 in the module's own folder).]])
whatis("Name: frameworks (parsl-aurora's fake cluster)")
whatis("Version: 2025.3.1")

local fake = myFileName():match("^(.*)/modulefiles/frameworks/[^/]*$")
prepend_path("PATH", pathJoin(fake, "frameworks", "bin"))
setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
setenv("ONEAPI_DEVICE_SELECTOR", "opencl:gpu;level_zero:gpu")
