import time
# Import the manager instance from your main application file
from main import manager

@manager.task(mode='process')
def complex_calculation(a, b):
    time.sleep(2)
    return a + b
