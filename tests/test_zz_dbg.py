import time, subprocess
def test_dbg(ray_session):
    import ray
    time.sleep(3)
    print("\nAVAIL", ray.available_resources().get("CPU"))
    print(subprocess.run("ps -eo etime,cmd | grep 'ray::' | grep -v grep", shell=True, capture_output=True, text=True).stdout)
