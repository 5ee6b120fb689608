@fixture.sqlite
Feature: An agent run is one plan (OpenAI Agents SDK)
  An agent built with the OpenAI Agents SDK runs inside an AgentPlan. Each call
  of a @plan_tool takes a checkpoint first and runs alone; a call that raises
  is rolled back to its checkpoint and the model is told about the error, as
  the SDK always does. When the run returns the model's final answer, all the
  work is committed; when it ends any other way, none of it is kept.

  The model here is the SDK's own scripted model, so every run is the same and
  nothing goes over the network. Rows are read through a separate connection.

  Background:
    Given a database "inventory.db" with an empty items table
    And an agent plan on "inventory.db"

  Scenario: Two tool calls, then an answer: the work is committed
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | add_item pear         |
      | 3    | answers "restocked"   |
    When the agent runs
    Then the agent plan was released
    And the run's final output is "restocked"
    And "inventory.db" has the items "apple, pear"

  Scenario: A failing tool call leaves no trace, and the others are kept
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | add_item bad-pear     |
      | 3    | add_item plum         |
      | 4    | answers "done"        |
    When the agent runs
    Then the model was told "An error occurred while running the tool. Please try again."
    And the agent plan rolled back the call to "add_item" at checkpoint "tool-2"
    And the agent plan was released
    And "inventory.db" has the items "apple, plum"

  Scenario: Two calls in one turn, one failing: only its own writes are undone
    Given the scripted model plays:
      | turn | does                                      |
      | 1    | add_item apple, add_item bad-pear, add_item plum |
      | 2    | answers "done"                            |
    When the agent runs
    Then the tool calls never overlapped
    And the agent plan rolled back the call to "add_item" at checkpoint "tool-2"
    And the agent plan was released
    And "inventory.db" has the items "apple, plum"

  Scenario: Running out of turns rolls everything back
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | add_item pear         |
    When the agent runs with at most 2 turns
    Then the agent run failed with MaxTurnsExceeded
    And the agent plan was rolled back
    And "inventory.db" has no items

  Scenario: Running out of turns rolls back even when an error handler answers
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | add_item pear         |
    When the agent runs with at most 2 turns and a max_turns error handler
    Then the run's final output is "gave up"
    And the agent plan was rolled back because "max turns exceeded"
    And "inventory.db" has no items

  Scenario: A final answer an output guardrail rejects commits nothing, even when caught
    Given the scripted model plays:
      | turn | does                            |
      | 1    | add_item apple                  |
      | 2    | answers "the secret code is 42" |
    And the agent's final answers must not mention "secret"
    When the agent runs and the block catches what the run raises
    Then the block caught OutputGuardrailTripwireTriggered
    And the agent plan was rolled back because "OutputGuardrailTripwireTriggered"
    And "inventory.db" has no items

  Scenario: A final answer the output guardrail accepts is committed
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | answers "restocked"   |
    And the agent's final answers must not mention "secret"
    When the agent runs
    Then the agent plan was released
    And "inventory.db" has the items "apple"

  Scenario: A model error rolls everything back
    Given the scripted model plays:
      | turn | does                         |
      | 1    | add_item apple               |
      | 2    | fails with ConnectionError   |
    When the agent runs
    Then the agent run failed with ConnectionError
    And the agent plan was rolled back
    And "inventory.db" has no items

  Scenario: Cancelling the run waits for the tool's thread, then rolls back
    Given the scripted model plays:
      | turn | does                      |
      | 1    | add_item apple            |
      | 2    | add_item_when_told pear   |
      | 3    | answers "done"            |
    When the agent runs and is cancelled while "add_item_when_told" runs
    Then the agent run failed with CancelledError
    And the thread of "add_item_when_told" had finished when the plan ended
    And the agent plan was rolled back
    And "inventory.db" has no items

  Scenario: A streamed run that is cancelled rolls back
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | never answers         |
    When the agent runs streamed and the stream is cancelled after the first tool output
    Then the agent plan was rolled back because "without a final output"
    And "inventory.db" has no items

  Scenario: A run stopped for a person's approval rolls back
    Given the scripted model plays:
      | turn | does                  |
      | 1    | add_item apple        |
      | 2    | clear_items           |
      | 3    | answers "done"        |
    When the agent runs
    Then the run is waiting for approval of "clear_items"
    And the agent plan was rolled back because "approval interruption"
    And "inventory.db" has no items

  Scenario: A model slower than checkpoint_ttl gets nothing committed
    Given the agent plan's checkpoint_ttl is "200ms"
    And the scripted model plays:
      | turn | does                                   |
      | 1    | add_item apple                         |
      | 2    | thinks until the plan expires, then answers "done" |
    When the agent runs
    Then the agent run failed with CheckpointExpiredError
    And the agent plan was rolled back
    And "inventory.db" has no items

  Scenario: After the plan expired, the run stops before its next model call
    Given the agent plan's checkpoint_ttl is "200ms"
    And the scripted model plays:
      | turn | does                                                |
      | 1    | add_item apple                                      |
      | 2    | thinks until the plan expires, then add_item pear   |
      | 3    | answers "done"                                      |
    When the agent runs
    Then the agent run failed with CheckpointExpiredError
    And the scripted model has 1 turn left
    And the agent plan was rolled back
    And "inventory.db" has no items

  Scenario: A plain function_tool cannot reach the plan's connection
    Given the scripted model plays:
      | turn | does                          |
      | 1    | sneak_in mole, add_item apple |
      | 2    | answers "done"                |
    When the agent runs
    Then the tool "sneak_in" was refused with ToolError
    And the agent plan was released
    And "inventory.db" has the items "apple"
