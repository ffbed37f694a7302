import fusedopt
from fusedopt import _C


def test_build_info_fields():
    info = fusedopt.build_info()
    assert info["version"] == fusedopt.__version__
    assert info["cpu_simd"] in ("baseline", "avx2", "avx512")
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"
    assert info["cuda_available"] == fusedopt.cuda_available()


def test_import_without_gpu_is_fine():
    # On machines without a driver the CUDA query must answer False, not raise.
    assert isinstance(_C.cuda_device_count(), int)


def test_num_threads_round_trip():
    fusedopt.set_num_threads(1)
    assert fusedopt.get_num_threads() == 1
    fusedopt.set_num_threads(0)  # all cores
    assert fusedopt.get_num_threads() >= 1
