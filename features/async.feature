@fixture.sqlite
Feature: Awaitable methods
  acreate_checkpoint, arollback_to, arelease_plan and arollback_plan run the
  handler's methods on the event loop's executor threads. A plan's connection
  belongs to the plan, not to a thread, so however many threads run them,
  the connections stay bounded and all of them close with the handler.

  A plan waiting for a connection or for its turn to write blocks the thread
  it runs on, so run fewer plans at once than the executor has threads.

  Scenario: Plans driven from an event loop with 8 executor threads
    Given a database "inventory.db" with an empty items table
    And an event loop with 8 executor threads
    And the open file descriptors are counted
    And a database handler with:
      | max_connections | 4 |
    And the resource "inventory" on "inventory.db"
    When 24 plans run on the event loop, 6 at a time, on "inventory", the even ones released and the odd ones rolled back
    Then "inventory.db" has 12 items, all of even plans
    And the handler stats are:
      | commits      | 12 |
      | rollbacks    | 12 |
      | active_plans | 0  |
      | checkpoints  | 0  |
    And the handler has at most 4 open connections
    When the handler is closed
    Then the open file descriptors are back to that count
