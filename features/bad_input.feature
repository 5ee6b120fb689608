@fixture.sqlite
Feature: Bad plan input is refused before anything runs
  Plans may be written by agents. "cleveragents validate" and "cleveragents
  run" refuse bad input with exit status 2 and one line per problem, in the
  form PATH:LINE: FIELD: problem, without a traceback, and no database is
  touched: no database file is created.

  Scenario: run refuses every plan when one of them is bad input
    Given the plan file "good.yaml":
      """
      id: good
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: schema
          resource: inventory
          sql: CREATE TABLE items (sku TEXT)
      """
    And the plan file "bad.yaml":
      """
      id: bad
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
          retyr: 3
      """
    When the operator runs "cleveragents run good.yaml bad.yaml"
    Then the exit status is 2
    And stderr has the line "bad.yaml:8: steps[0].retyr: unknown key"
    And stderr has 1 lines
    And stdout is empty
    And no file was created in the scenario's folder but the plans

  Scenario: Two plans of one run with the same id are refused, none is run
    Given the plan file "first.yaml":
      """
      id: restock
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: schema
          resource: inventory
          sql: CREATE TABLE items (sku TEXT)
      """
    And the plan file "second.yaml":
      """
      description: the same id, further down
      id: restock
      resources:
        inventory: {kind: database, engine: sqlite, location: other.db}
      steps:
        - id: schema
          resource: inventory
          sql: CREATE TABLE items (sku TEXT)
      """
    When the operator runs "cleveragents run --parallel 2 first.yaml second.yaml"
    Then the exit status is 2
    And stderr has the line "second.yaml:2: id: plan id 'restock' is also the id of first.yaml:1; plans run together need different ids"
    And stderr has 1 lines
    And stdout is empty
    And there is no traceback
    And no file was created in the scenario's folder but the plans
    When the operator runs "cleveragents run first.yaml second.yaml"
    Then the exit status is 2
    And stderr has 1 lines
    And no file was created in the scenario's folder but the plans
    When the operator runs "cleveragents validate first.yaml second.yaml"
    Then the exit status is 0

  Scenario: A YAML syntax error
    Given the plan file "bad.yaml":
      """
      id: bad
      steps:
        - id: oops
          sql: [SELECT 1
      """
    When the operator runs "cleveragents validate bad.yaml"
    Then the exit status is 2
    And stderr has a line starting with "bad.yaml:5: YAML: "
    And stderr has 1 lines

  Scenario: Unknown names: a resource setting, a resource, a kind, an engine, a tool
    Given the plan file "setting.yaml":
      """
      resources:
        inventory:
          kind: database
          engine: sqlite
          location: inventory.db
          checkpoint_tll: 5s
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
      """
    And the plan file "resource.yaml":
      """
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: oops
          resource: inventroy
          sql: SELECT 1
      """
    And the plan file "kind.yaml":
      """
      resources:
        inventory: {kind: queue, location: inventory.db}
      steps:
        - id: oops
          tool: send_report
      """
    And the plan file "engine.yaml":
      """
      resources:
        inventory: {kind: database, engine: oracle, location: inventory.db}
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
      """
    And the plan file "tool.yaml":
      """
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: oops
          tool: launch_rockets
      """
    When the operator runs "cleveragents run setting.yaml resource.yaml kind.yaml engine.yaml tool.yaml"
    Then the exit status is 2
    And stderr has the line "setting.yaml:6: resources.inventory.checkpoint_tll: unknown key"
    And stderr has the line "resource.yaml:5: steps[0].resource: unknown resource 'inventroy' (known: inventory)"
    And stderr has a line starting with "kind.yaml:2: resources.inventory.kind: unknown resource kind 'queue'"
    And stderr has a line starting with "engine.yaml:2: resources.inventory.engine: "
    And stderr has a line starting with "tool.yaml:5: steps[0].tool: unknown tool 'launch_rockets'"
    And stderr has 5 lines
    And there is no traceback
    And no file was created in the scenario's folder but the plans

  Scenario: Duplicate step ids, and a key written twice
    Given the plan file "twice.yaml":
      """
      id: twice
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
          sql: DELETE FROM items
      """
    And the plan file "bad.yaml":
      """
      id: bad
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: twice
          resource: inventory
          sql: SELECT 1
        - id: twice
          resource: inventory
          sql: SELECT 2
      """
    When the operator runs "cleveragents validate twice.yaml bad.yaml"
    Then the exit status is 2
    And stderr has the line "twice.yaml:8: YAML: duplicate key 'sql' (first at line 7)"
    And stderr has the line "bad.yaml:8: steps[1].id: duplicate step id 'twice'"
    And stderr has 2 lines

  Scenario: A value of the wrong type, and a bad duration
    Given the plan file "type.yaml":
      """
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
          retry: many
      """
    And the plan file "duration.yaml":
      """
      resources:
        inventory:
          kind: database
          engine: sqlite
          location: inventory.db
          checkpoint_ttl: soon
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
      """
    When the operator runs "cleveragents validate type.yaml duration.yaml"
    Then the exit status is 2
    And stderr has a line starting with "type.yaml:7: steps[0].retry: "
    And stderr has a line starting with "duration.yaml:6: resources.inventory.checkpoint_ttl: expected a duration"
    And stderr has 2 lines

  Scenario: A location outside the allowed folders, unless allowed with --allow-root
    Given the plan file "bad.yaml":
      """
      id: bad
      resources:
        inventory: {kind: database, engine: sqlite, location: ../elsewhere.db}
      steps:
        - id: oops
          resource: inventory
          sql: CREATE TABLE t (x INT)
      """
    When the operator runs "cleveragents run bad.yaml"
    Then the exit status is 2
    And stderr has a line starting with "bad.yaml:3: resources.inventory.location: '../elsewhere.db' is outside the allowed folders"
    And there is no file "../elsewhere.db"
    When the operator runs "cleveragents validate --allow-root .. bad.yaml"
    Then the exit status is 0

  Scenario: A location that cannot be a database file, and an id with control characters
    Given a folder "shelf.db"
    And the plan file "no-folder.yaml":
      """
      resources:
        inventory: {kind: database, engine: sqlite, location: cellar/inventory.db}
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
      """
    And the plan file "folder.yaml":
      """
      resources:
        inventory: {kind: database, engine: sqlite, location: shelf.db}
      steps:
        - id: oops
          resource: inventory
          sql: SELECT 1
      """
    And the plan file "control.yaml":
      """
      id: "tab\there"
      steps:
        - id: oops
          tool: send_report
      """
    When the operator runs "cleveragents validate no-folder.yaml folder.yaml control.yaml"
    Then the exit status is 2
    And stderr has a line starting with "no-folder.yaml:2: resources.inventory.location: folder "
    And stderr mentions "cellar' does not exist"
    And stderr has the line "folder.yaml:2: resources.inventory.location: 'shelf.db' is a folder, not a database file"
    And stderr has a line starting with "control.yaml:1: id: must be 1 to 256 printable characters"
    And stderr has 3 lines

  Scenario: An empty file, and a file that is not a mapping
    Given an empty plan file "empty.yaml"
    And the plan file "list.yaml":
      """
      - id: oops
      """
    When the operator runs "cleveragents validate empty.yaml list.yaml"
    Then the exit status is 2
    And stderr has a line starting with "empty.yaml:1: "
    And stderr mentions "empty"
    And stderr has a line starting with "list.yaml:1: "
    And stderr mentions "mapping"
    And stderr has 2 lines

  Scenario: Every problem of a file is reported, in the order of its lines
    Given the plan file "bad.yaml":
      """
      id: bad
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: one
          resource: nowhere
          sql: SELECT 1
        - id: two
          tool: no_such_tool
      """
    When the operator runs "cleveragents validate bad.yaml"
    Then the exit status is 2
    And stderr has 2 lines
    And stderr has a line starting with "bad.yaml:6: steps[0].resource: unknown resource 'nowhere'"
    And stderr has a line starting with "bad.yaml:9: steps[1].tool: unknown tool 'no_such_tool'"

  Scenario: A step does exactly one thing: SQL, a check, or a tool
    Given the plan file "bad.yaml":
      """
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: both
          resource: inventory
          sql: SELECT 1
          tool: send_report
        - id: nothing
          resource: inventory
        - id: nowhere
          sql: SELECT 1
        - id: loose-params
          tool: send_report
          params: {n: 1}
        - id: loose-with
          resource: inventory
          sql: SELECT 1
          with: {channel: ops}
      """
    When the operator runs "cleveragents validate bad.yaml"
    Then the exit status is 2
    And stderr has 5 lines
    And stderr has a line starting with "bad.yaml:4: steps[0]: a step runs either a 'tool' or 'sql'/'expect', not both"
    And stderr has a line starting with "bad.yaml:8: steps[1]: a step needs 'sql', 'expect' or 'tool'"
    And stderr has a line starting with "bad.yaml:10: steps[2]: a step with 'sql' or 'expect' needs 'resource'"
    And stderr has a line starting with "bad.yaml:12: steps[3]: 'params' needs 'sql'"
    And stderr has a line starting with "bad.yaml:15: steps[4]: 'with' needs 'tool'"

  Scenario: A plan file that is missing, or not UTF-8 text
    Given a file "latin1.yaml" that is not UTF-8 text
    When the operator runs "cleveragents validate missing.yaml latin1.yaml"
    Then the exit status is 2
    And stderr has the line "missing.yaml: file not found"
    And stderr has a line starting with "latin1.yaml: not UTF-8 text"
    And stderr has 2 lines
