# main.py: the design plan's FastAPI example (section 6), with three changes:
# - beaver's real import (`from beaver import BeaverDB`), and the file sits
#   next to this one instead of in /var/data;
# - `if task_handle is None:` where the plan wrote `if not task_handle:`, since
#   a handle is falsy while its task is pending (bool(handle) means finished);
# - an HTTPException for 404, since FastAPI cannot return the plan's tuple.
from beaver import BeaverDB
import castor
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

# --- Core Application Objects ---
db = BeaverDB("my_app_tasks.db")
manager = castor.Manager(db)
app = FastAPI()

# Import task definitions AFTER manager is created to ensure they register
from tasks import complex_calculation, fetch_status

# --- API Models and Endpoints ---
class TaskResponse(BaseModel):
    task_id: str
    status: str
    result: dict | str | int | None = None

@app.post("/calculate", response_model=TaskResponse, status_code=202)
async def calculate_endpoint():
    """ Enqueues a task and returns its handle immediately. """
    task_handle = complex_calculation.delay(100, 250)
    return TaskResponse(task_id=task_handle.id, status=task_handle.status())

@app.get("/tasks/{task_id}", response_model=TaskResponse)
async def get_task_status(task_id: str):
    """ Polls for the status and result of a task. """
    task_handle = manager.get_task_by_id(task_id)

    if task_handle is None:
        raise HTTPException(status_code=404, detail="Task not found")

    status = task_handle.status()
    result = None
    if task_handle: # Check if finished
        try:
            # Task is done, so join() will return immediately without blocking.
            result = task_handle.join(timeout=0.1)
        except Exception as e:
            result = f"Task failed: {str(e)}"

    return TaskResponse(task_id=task_handle.id, status=status, result=result)


# --- Beyond the design plan: an async task, awaited without blocking ---
class PingResponse(BaseModel):
    task_id: str
    result: dict


@app.post("/ping", response_model=PingResponse)
async def ping_endpoint(url: str = "https://example.com/health"):
    """ Runs an async task on the worker's event loop and awaits its result. """
    task_handle = fetch_status.delay(url)
    result = await task_handle.resolve(timeout=10)
    return PingResponse(task_id=task_handle.id, result=result)
