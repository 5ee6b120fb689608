@fixture.sqlite
Feature: Retrying a step from its checkpoint
  "retry: N" takes a checkpoint before the step; when the step fails, the plan
  rolls back to it and runs the step again, up to N more times. Whatever the
  failed attempts wrote is gone. A tool sees which attempt it is in ctx.attempt.

  Background:
    Given a database "inventory.db" with the items "apple"
    And a runtime with the in-test tools plugin

  Scenario: A step that fails twice passes on its third attempt
    Given the plan file "flaky.yaml":
      """
      id: flaky
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: before
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: flaky
          tool: add_item_failing_before
          retry: 2
          with: {sku: plum, passes_on: 3}
      """
    When the runtime runs "flaky.yaml"
    Then plan "flaky" completed
    And step "flaky" of plan "flaky" passed after 3 attempts
    And "inventory.db" has the items "apple, pear, plum-attempt-3"
    And subscriber "recorder" was told "started, completed" for plan "flaky"

  Scenario: A step that keeps failing fails the plan once its retries are used up
    Given the plan file "flaky.yaml":
      """
      id: flaky
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: before
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: flaky
          tool: add_item_failing_before
          retry: 1
          with: {sku: plum, passes_on: 3}
      """
    When the runtime runs "flaky.yaml"
    Then plan "flaky" failed at step "flaky"
    And step "flaky" of plan "flaky" failed after 2 attempts
    And the error of plan "flaky" mentions "attempt 2 of step 'flaky' fails on purpose"
    And "inventory.db" has the items "apple"
    And subscriber "recorder" was told "started, failed" for plan "flaky"

  Scenario: A step retried on its resource keeps the work done before its checkpoint
    Given the plan file "flaky.yaml":
      """
      id: flaky
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: before
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: flaky
          resource: inventory
          retry: 2
          expect:
            sql: SELECT count(*) FROM items
            equals: 2
      """
    When the runtime runs "flaky.yaml"
    Then plan "flaky" completed
    And step "flaky" of plan "flaky" passed after 1 attempts
    And "inventory.db" has the items "apple, pear"

  Scenario: A plan the reaper rolled back fails at once, without retrying
    Given the plan file "slow.yaml":
      """
      id: slow
      resources:
        inventory:
          kind: database
          engine: sqlite
          location: inventory.db
          checkpoint_ttl: 300ms
      steps:
        - id: before
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: daydream
          tool: idle_until_reaped
          retry: 3
      """
    When the runtime runs "slow.yaml"
    Then plan "slow" failed at step "daydream"
    And step "daydream" of plan "slow" failed after 1 attempts
    And the error of plan "slow" mentions "checkpoint_ttl (0.3s)"
    And the error of plan "slow" mentions "the reaper rolled it back"
    And "inventory.db" has the items "apple"
    And subscriber "recorder" was told "started, failed" for plan "slow"
